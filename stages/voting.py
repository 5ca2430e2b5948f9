"""GranD's cross-model agreement: the detectors' boxes -> `objects` (a second model agrees),
`floating_objects` (nobody agrees) and `floating_attributes` (the box is named by an attribute, not
an object). Cheap logic, run as a Ray task; the agreement rule is `boxes.vote`.

Floating attributes (GranD: "attribute-only boxes become floating_attributes"). The detectors are
queried with the image's tags (object nouns) plus configured classes, which may be attribute phrases
("red", "wooden", "red wooden"). A detection is attribute-only when every word of its label is in the
attribute vocabulary (`stages/vocab/attributes.txt`: colour, material, state) and the label is not
one of the frame's tags (so the tag "orange", the fruit, stays an object). Attribute-only detections
take no part in voting; each becomes `{bbox, attributes (the label's words), score, detector}`.

Masks. When the masks stage ran before (detection -> masks -> voting), every detection carries its
SAM2 mask and GranD's full rule applies in one vote: box IoU >= 0.65 and mask Dice >= 0.75. Without
masks the rule compares boxes alone. Each mask is then stored once: it moves from the detection to
the object or floating object that detection leads (`record["voting"]["masks"]` says which rule ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from groundmill.schema import (
    DETECTION_MASK_FIELDS,
    FloatingAttribute,
    FrameRecord,
    Object,
    VotingRule,
    decode_mask,
)
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.boxes import Box, Detection, vote
from groundmill.stages.vocab_groups import load_groups


@lru_cache(maxsize=8)
def attribute_words(vocabulary: str) -> frozenset[str]:
    """Every value of a grouped attribute vocabulary (by stem or `.txt` path)."""
    return frozenset(v for values in load_groups(vocabulary).values() for v in values)


def attribute_only(label: str, words: frozenset[str], tags: set[str]) -> list[str]:
    """The label's words when all of them are attribute words and the label is not a tag, else []."""
    parts = label.lower().split()
    if not parts or label.lower() in tags or not all(w in words for w in parts):
        return []
    return parts


def separate_attributes(
    frame: FrameRecord, words: frozenset[str]
) -> tuple[dict[str, list[Detection]], list[FloatingAttribute]]:
    """A frame's detections split into those that vote (per model) and the attribute-only ones
    (best score first)."""
    tags = {t["label"].lower() for t in frame.get("tags", [])}
    voting: dict[str, list[Detection]] = {}
    attributes: list[FloatingAttribute] = []
    for model, dets in frame.get("detections", {}).items():
        voting[model] = []
        for d in dets:
            if attrs := attribute_only(d["label"], words, tags):
                attributes.append(
                    FloatingAttribute(
                        bbox=list(d["bbox"]), attributes=attrs, score=d["score"], detector=model
                    )
                )
            else:
                voting[model].append(d)
    attributes.sort(key=lambda a: -a["score"])
    return voting, attributes


def merge(
    per_model: dict[str, list[Detection]], rule: VotingRule, mask_of: dict[Box, np.ndarray] | None = None
) -> tuple[list[Object], list[Object]]:
    """(objects, floating_objects) of one frame under `rule`: `boxes.vote`, then at most `max_objects`
    in all, objects before floating ones. `mask_of` (box -> mask) adds the Dice check: a detection's
    mask is the one of its box, so identical boxes of two models share a mask."""
    masks = None
    if mask_of is not None:
        masks = {model: [mask_of[tuple(d["bbox"])] for d in dets] for model, dets in per_model.items()}
    objects, floating = vote(per_model, rule["min_iou"], rule["min_dice"], masks, rule.get("min_agreeing", 1))
    limit = rule["max_objects"]
    return objects[:limit], floating[: max(0, limit - len(objects))]


def detection_masks(frame: FrameRecord) -> dict[Box, np.ndarray] | None:
    """box -> mask of a frame's detections when every one carries its mask (the masks stage ran
    before voting), else None."""
    dets = [d for ds in frame.get("detections", {}).values() for d in ds]
    if not all("segmentation" in d for d in dets):  # a frame without detections: vacuously all
        return None
    return {tuple(d["bbox"]): decode_mask(d["segmentation"]) for d in dets}


def move_masks(frame: FrameRecord) -> None:
    """Each object takes its lead detection's mask fields (the lead's box is the object's box); the
    detections keep their raw form, so every mask is stored once."""
    fields: dict[Box, dict[str, Any]] = {}
    for dets in frame.get("detections", {}).values():
        for d in dets:
            fields[tuple(d["bbox"])] = {k: d.pop(k) for k in DETECTION_MASK_FIELDS if k in d}
    for obj in frame["objects"] + frame["floating_objects"]:
        obj.update(fields[tuple(obj["bbox"])])


class BoxVoting(Stage):
    name = "voting"
    provides = ("voting", "objects", "floating_objects", "floating_attributes")
    requires = ("detections",)
    uses = ("detections.segmentation",)  # the masks stage must run before voting to take part
    uses_model = False
    uses_pixels = False

    @dataclass
    class Params:
        min_iou: float = 0.65  # GranD: box IoU >= 0.65 ...
        min_dice: float = 0.75  # ... and mask Dice >= 0.75 (when the masks stage ran before voting)
        min_agreeing: int = 1  # other detection stages that must agree (GranD: a second model)
        max_objects: int = 100  # per image, best first (objects before floating ones)
        attribute_vocabulary: str = "attributes"  # a grouped vocabulary: `group: value, value, ...`

        def __post_init__(self) -> None:
            if self.min_agreeing < 1:
                raise ValueError("min_agreeing", f"{self.min_agreeing} is not >= 1")

    def rule(self) -> VotingRule:
        p = self.params
        return VotingRule(
            min_iou=p.min_iou,
            min_dice=p.min_dice,
            min_agreeing=p.min_agreeing,
            max_objects=p.max_objects,
            masks=False,
            attribute_vocabulary=p.attribute_vocabulary,
        )

    def process(self, samples: list[Sample]) -> None:
        words = attribute_words(self.params.attribute_vocabulary)
        for view in views_of(samples):
            record = view.record
            per_model, record["floating_attributes"] = separate_attributes(record, words)
            masks = detection_masks(record)
            rule = VotingRule(**{**self.rule(), "masks": masks is not None})
            record["objects"], record["floating_objects"] = merge(per_model, rule, masks)
            record["voting"] = rule
            if masks is not None:
                move_masks(record)

    def provenance(self) -> dict[str, Any]:
        p = self.params
        return {
            "min_iou": p.min_iou,
            "min_dice": p.min_dice,
            "min_agreeing": p.min_agreeing,
            "max_objects": p.max_objects,
            "attribute_vocabulary": p.attribute_vocabulary,
        }
