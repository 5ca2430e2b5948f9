"""The model in the loop: a checkpoint of the bundled X2SAM trainer (model/) segments, per image, the
record's referring expressions and GCG phrases, every object's label, and a fixed list of phrases.

Each text is asked as the trainer's referring question ("please segment {text} ." -> "it is [SEG] .",
model/tasks.py) through `model.predict.predict_present`, all texts of an image in one batch over one
encoding. A mask is the model's probability above `mask_threshold`, resized to the stored image; its
`score` is the mean probability inside it (X2SAM has no IoU head here), and masks below `min_score` or
empty are not kept, nor those of a text the model says is not there: a checkpoint trained on hard
negatives answers "there is none" for them, and a presence probability under `min_presence` drops the
mask. They are written beside SAM2's, never over them (`x2sam`, one entry per text, each with its
own `segmentation_source`); the `prefer_masks` stage (stages/prefer_masks.py) swaps them in where a
verifier's score says SAM2's mask is worse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from groundmill.schema import FrameRecord, encode_mask
from groundmill.stages.base import Sample, Stage, View, views_of

SOURCE = "x2sam"
SOURCES = ("referring", "gcg", "labels")


@dataclass
class Query:
    kind: str  # referring | gcg | labels | phrases
    text: str
    object_ids: list[int]


def queries(frame: FrameRecord, sources: list[str], phrases: list[str]) -> list[Query]:
    """The texts to segment in one image, first occurrence of each text kept (its object ids merged)."""
    found: list[Query] = []
    if "referring" in sources:
        found += [
            Query("referring", r["expression"], [r["object_id"]])
            for r in frame.get("referring_expressions", [])
        ]
    if "gcg" in sources and frame.get("gcg"):
        found += [Query("gcg", g["phrase"], list(g["object_ids"])) for g in frame["gcg"]["groundings"]]
    if "labels" in sources:
        found += [
            Query("labels", o["labels"][0], [o["id"]]) for o in frame.get("objects", []) if o.get("labels")
        ]
    found += [Query("phrases", p, []) for p in phrases]
    merged: dict[str, Query] = {}
    for q in found:
        if q.text in merged:
            merged[q.text].object_ids = sorted(set(merged[q.text].object_ids) | set(q.object_ids))
        else:
            merged[q.text] = q
    return list(merged.values())


def mask_entry(
    query: Query, prob: np.ndarray, size: tuple[int, int], threshold: float
) -> dict[str, Any] | None:
    """One text's stored mask (at the image's `size`, W x H) and score, or None when it is empty."""
    small = prob > threshold
    if not small.any():
        return None
    mask = np.asarray(Image.fromarray(small).resize(size, Image.NEAREST))
    if not mask.any():
        return None
    return {
        "kind": query.kind,
        "text": query.text,
        "object_ids": query.object_ids,
        "segmentation": encode_mask(mask),
        "segmentation_source": SOURCE,
        "score": round(float(prob[small].mean()), 4),
    }


class X2SamSegmentation(Stage):
    name = "x2sam"
    provides = ("x2sam",)
    uses = ("referring_expressions", "gcg", "objects")

    @dataclass
    class Params:
        sources: list[str] = field(default_factory=lambda: list(SOURCES))  # which record texts to ask
        phrases: list[str] = field(default_factory=list)  # asked of every image (a closed vocabulary)
        mask_threshold: float = 0.5  # on the mask probability
        min_score: float = 0.5  # a mask whose mean probability is lower is not kept
        min_presence: float = 0.5  # P("it is [SEG]" over "there is none"), model.predict.presence

        def __post_init__(self) -> None:
            unknown = set(self.sources) - set(SOURCES)
            if unknown:
                raise ValueError("sources", f"{sorted(unknown)} not among {list(SOURCES)}")

    def setup(self) -> None:
        import torch

        from groundmill.model.config import load_config
        from groundmill.model.predict import load_for_eval

        ckpt = Path(self.model_spec.id)
        self.cfg = load_config(
            ckpt / "config.yaml", ["device=cpu"] if self.model_spec.device == "cpu" else None
        )
        cuda = torch.cuda.is_available() and self.model_spec.device in ("auto", "cuda")
        self.device = torch.device("cuda" if cuda else "cpu")
        self.model, self.processor = load_for_eval(self.cfg, ckpt)
        self.model.to(self.device)

    def _rows(self, view: View, texts: list[str]) -> list[dict[str, Any]]:
        from groundmill.model.tasks import ANSWER, QUESTIONS

        size = self.cfg.vision.image_size
        frames = [np.asarray(view.image.resize((size, size)))]  # one list: encoded once for all texts
        blank = np.zeros((size, size), np.float32)
        return [
            {
                "question": QUESTIONS["referring"].format(t),
                "answer": ANSWER,
                "masks": [[blank]],
                "frames": frames,
            }
            for t in texts
        ]

    def process(self, samples: list[Sample]) -> None:
        from groundmill.model.predict import predict_present

        p = self.params
        asked = [(view, queries(view.record, p.sources, p.phrases)) for view in views_of(samples)]
        rows = [row for view, qs in asked for row in self._rows(view, [q.text for q in qs])]
        found = iter(predict_present(self.model, rows, self.processor, self.cfg, self.device) if rows else [])
        for view, qs in asked:
            entries = []
            for q in qs:
                logits, present = next(found)
                if present < p.min_presence:
                    continue
                prob = 1 / (1 + np.exp(-logits[0, 0]))
                entry = mask_entry(q, prob, view.image.size, p.mask_threshold)
                if entry and entry["score"] >= p.min_score:
                    entries.append(entry)
            view.record["x2sam"] = entries

    def provenance(self) -> dict[str, Any]:
        step = None
        state = Path(self.model_spec.id) / "state.json"
        if state.is_file():
            import json

            step = json.loads(state.read_text()).get("step")
        return {"model": self.model_spec.id, "random_weights": False, "checkpoint_step": step}
