"""Labels and attributes per object: CLIP scores each object's crop against its candidate labels (the
detectors' labels plus the image's tags) and against an attribute vocabulary (colour, material,
state), GranD's "label assignment by CLIP-style scoring" and attribute enrichment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.clip import load_clip, zero_shot_probs
from groundmill.stages.vocab_groups import load_groups


def rank_labels(probs: np.ndarray, candidates: list[str], top_k: int) -> list[str]:
    """The candidates by probability, best first, at most top_k (ties keep candidate order)."""
    return [candidates[i] for i in np.argsort(-probs, kind="stable")[:top_k]]


def pick_attributes(
    group_probs: dict[str, np.ndarray], groups: dict[str, list[str]], min_prob: float
) -> list[str]:
    """At most one value per group: the group's most probable value when it reaches min_prob."""
    picked = []
    for group, probs in group_probs.items():
        best = int(np.argmax(probs))
        if probs[best] >= min_prob:
            picked.append(groups[group][best])
    return picked


def crop(image, bbox: list[float], margin: float):
    """The box region of a PIL image, widened by `margin` x its size on each side, at least 1 px."""
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    x0, y0 = max(0, int(bbox[0] - margin * w)), max(0, int(bbox[1] - margin * h))
    x1 = min(image.width, max(x0 + 1, int(np.ceil(bbox[2] + margin * w))))
    y1 = min(image.height, max(y0 + 1, int(np.ceil(bbox[3] + margin * h))))
    return image.crop((x0, y0, x1, y1))


class ClipAttributes(Stage):
    name = "attributes"
    provides = ("objects.labels", "objects.attributes")
    requires = ("objects",)

    @dataclass
    class Params:
        vocabulary: str = "attributes"  # a grouped vocabulary: `group: value, value, ...`
        label_prompt: str = "a photo of a {}."
        attribute_prompt: str = "a photo of a {} object."
        top_k_labels: int = 3
        min_attribute_prob: float = 0.2
        crop_margin: float = 0.05

    def setup(self) -> None:
        self.clip = load_clip(self.model_spec, self.resources, self.seed)
        self.groups = load_groups(self.params.vocabulary)
        self.attr_emb = {
            g: self.clip.encode_texts([self.params.attribute_prompt.format(v) for v in values])
            for g, values in self.groups.items()
        }
        self.label_emb: dict[str, np.ndarray] = {}  # cache: label -> text embedding

    def _labels_emb(self, labels: list[str]) -> np.ndarray:
        missing = [lb for lb in labels if lb not in self.label_emb]
        if missing:
            emb = self.clip.encode_texts([self.params.label_prompt.format(lb) for lb in missing])
            self.label_emb.update(zip(missing, emb, strict=True))
        return np.stack([self.label_emb[lb] for lb in labels])

    def process(self, samples: list[Sample]) -> None:
        p = self.params
        for view in views_of(samples):
            objs = view.record.get("objects", []) + view.record.get("floating_objects", [])
            if not objs:
                continue
            crops = self.clip.encode_images([crop(view.image, o["bbox"], p.crop_margin) for o in objs])
            tags = [t["label"] for t in view.record.get("tags", [])]
            scale = self.clip.logit_scale
            group_probs = {g: zero_shot_probs(crops, emb, scale) for g, emb in self.attr_emb.items()}
            for n, obj in enumerate(objs):
                candidates = list(dict.fromkeys(obj["labels"] + tags))
                probs = zero_shot_probs(crops[n : n + 1], self._labels_emb(candidates), scale)[0]
                obj["labels"] = rank_labels(probs, candidates, p.top_k_labels)
                per_object = {g: probs_g[n] for g, probs_g in group_probs.items()}
                obj["attributes"] = pick_attributes(per_object, self.groups, p.min_attribute_prob)
