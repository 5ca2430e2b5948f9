"""Stuff segmentation with CASS (training-free open-vocabulary semantic segmentation, CVPR 2025):
sky, road, grass, wall... regions that GranD's box detectors never propose.

Every pixel is scored over the stuff vocabulary (COCO-Stuff / ADE20K names, `stages/vocab`) plus
the thing vocabulary (COCO), so a person's pixels go to "person" rather than to the nearest stuff
name; only stuff classes are written, each as one region `{id, label, segmentation, score, area}`
(score: the mean probability over the region). Ids continue after the frame's objects, so scene
graph relations and GCG groundings can name a region. The model and the math are in
`stages.cass` and `stages.spectral`; CLIP is the stage's `model`, DINO is `params.dino`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from groundmill.schema import FrameRecord, StuffRegion, encode_mask
from groundmill.stages.base import ModelSpec, Sample, Stage, views_of
from groundmill.stages.tagging import load_vocabulary


def next_free_id(frame: FrameRecord) -> int:
    """One past the largest id of the frame's objects, floating objects and stuff regions."""
    ids = [o["id"] for g in ("objects", "floating_objects") for o in frame.get(g, [])]
    ids += [s["id"] for s in frame.get("stuff", [])]
    return max(ids, default=-1) + 1


def competing_labels(stuff: list[str], things: list[str]) -> list[str]:
    """The classes every pixel is scored over: the stuff names, then the thing names not among them."""
    known = set(stuff)
    return stuff + [t for t in things if t not in known]


def stuff_regions(
    labels: np.ndarray,
    probs: np.ndarray,
    names: list[str],
    num_stuff: int,
    min_score: float,
    min_area_frac: float,
    first_id: int,
) -> list[StuffRegion]:
    """One region per stuff class (index < num_stuff) in a label map: its pixels whose probability
    reaches `min_score`, kept when they cover `min_area_frac` of the image; largest first."""
    confident = probs >= min_score
    min_area = max(1, int(np.ceil(min_area_frac * labels.size)))
    found = []
    for c in np.unique(labels[confident]):
        if c >= num_stuff:
            continue
        mask = confident & (labels == c)
        area = int(mask.sum())
        if area >= min_area:
            found.append((area, int(c), mask, float(probs[mask].mean())))
    found.sort(key=lambda f: (-f[0], f[1]))
    return [
        StuffRegion(id=first_id + i, label=names[c], segmentation=encode_mask(mask), score=round(score, 4), area=area)
        for i, (area, c, mask, score) in enumerate(found)
    ]  # fmt: skip


class CassStuff(Stage):
    name = "stuff"
    provides = ("stuff",)
    uses = ("objects", "floating_objects")  # region ids continue after theirs

    @dataclass
    class Params:
        dino: str = "tiny"  # DINO ViT (transformers ViTModel): hub id, local path, or tiny
        dino_revision: str | None = None
        vocabularies: list[str] = field(default_factory=lambda: ["coco_stuff"])
        thing_vocabularies: list[str] = field(default_factory=lambda: ["coco"])  # scored, never written
        prompts: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a photo of the {}."])
        short_side: int = 336  # the image's short side, in pixels, while it is segmented (CASS: 336)
        # Pixels less probable than this (softmax over every class, scale 40) stay unlabelled; CASS
        # itself thresholds nothing on COCO-Stuff. Not tuned on real weights here.
        min_score: float = 0.1
        min_area_frac: float = 0.01  # smaller regions are dropped
        # CASS's object-presence settings (gamma, text shift, Ward cut) of its ADE20K-847 config
        presence_weight: float = 0.3
        text_shift: float = 0.05
        cluster_threshold: float = 0.06
        k_eigen: int = 20
        scale_factor: float = 10.0
        energy_threshold: float = 0.95
        gaussian_std: float = 5.0
        logit_scale: float = 40.0

    def settings(self) -> Any:
        from groundmill.stages.cass import CassSettings

        p = self.params
        return CassSettings(
            k_eigen=p.k_eigen,
            scale_factor=p.scale_factor,
            energy_threshold=p.energy_threshold,
            gaussian_std=p.gaussian_std,
            presence_weight=p.presence_weight,
            text_shift=p.text_shift,
            cluster_threshold=p.cluster_threshold,
            logit_scale=p.logit_scale,
        )

    def setup(self) -> None:
        from groundmill.stages.cass import load_dino
        from groundmill.stages.clip import load_clip
        from groundmill.stages.spectral import class_clusters

        stuff = load_vocabulary(self.params.vocabularies)
        self.num_stuff = len(stuff)
        self.names = competing_labels(stuff, load_vocabulary(self.params.thing_vocabularies))
        self.clip = load_clip(self.model_spec, self.resources, self.seed)
        self.dino = load_dino(self.params.dino, self.params.dino_revision, self.resources, self.seed)
        per_prompt = [self.clip.encode_texts([p.format(w) for w in self.names]) for p in self.params.prompts]
        mean = np.mean(per_prompt, axis=0)
        text = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        self.clusters = class_clusters(text, self.params.cluster_threshold)
        self.text = torch.from_numpy(text).float()

    def process(self, samples: list[Sample]) -> None:
        from groundmill.stages.cass import segment

        settings = self.settings()
        for view in views_of(samples):
            labels, probs = segment(
                self.clip, self.dino, view.image, self.text, self.clusters, settings, self.params.short_side
            )
            p = self.params
            view.record["stuff"] = stuff_regions(
                labels,
                probs,
                self.names,
                self.num_stuff,
                p.min_score,
                p.min_area_frac,
                next_free_id(view.record),
            )

    def provenance(self) -> dict[str, Any]:
        from groundmill.stages.hub import random_weights

        info = super().provenance()
        dino = ModelSpec(id=self.params.dino, revision=self.params.dino_revision)
        info.update(dino=self.params.dino, vocabularies=list(self.params.vocabularies))
        info["random_weights"] = info["random_weights"] or random_weights(dino)
        return info
