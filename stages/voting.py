"""GranD's cross-model agreement: the detectors' boxes -> `objects` (a second model agrees),
`floating_objects` (nobody agrees) and `floating_attributes` (the box is named by an attribute, not
an object). Cheap logic, run as a Ray task; the agreement rule is `boxes.vote`.

Floating attributes (GranD: "attribute-only boxes become floating_attributes"). The detectors are
queried with the image's tags (object nouns) plus configured classes, which may be attribute phrases
("red", "wooden", "red wooden"). A detection is attribute-only when every word of its label is in the
attribute vocabulary (`stages/vocab/attributes.txt`: colour, material, state) and the label is not
one of the frame's tags (so the tag "orange", the fruit, stays an object). Attribute-only detections
take no part in voting; each becomes `{bbox, attributes (the label's words), score, detector}`.

This stage runs before any mask exists, so it can only compare boxes. It writes the rule it applied
into each frame (`record["voting"]`, with `masks: false`); the masks stage, which prompts SAM2 with
every voting detection's box, re-applies that same rule with mask Dice as well (GranD's full rule:
box IoU >= 0.65 and mask Dice >= 0.75) and sets `masks: true`. The thresholds are configured once,
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from groundmill.schema import FloatingAttribute, FrameRecord, Object, VotingRule
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.boxes import Detection, vote
from groundmill.stages.vocab_groups import load_groups

Box = tuple[float, ...]


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
    objects, floating = vote(per_model, rule["min_iou"], rule["min_dice"], masks)
    limit = rule["max_objects"]
    return objects[:limit], floating[: max(0, limit - len(objects))]


class BoxVoting(Stage):
    name = "voting"
    provides = ("voting", "objects", "floating_objects", "floating_attributes")
    requires = ("detections",)
    uses_model = False

    @dataclass
    class Params:
        min_iou: float = 0.65  # GranD: box IoU >= 0.65 ...
        min_dice: float = 0.75  # ... and mask Dice >= 0.75 (applied when the masks stage re-votes)
        max_objects: int = 100  # per image, best first (objects before floating ones)
        attribute_vocabulary: str = "attributes"  # a grouped vocabulary: `group: value, value, ...`

    def rule(self) -> VotingRule:
        p = self.params
        return VotingRule(
            min_iou=p.min_iou,
            min_dice=p.min_dice,
            max_objects=p.max_objects,
            masks=False,
            attribute_vocabulary=p.attribute_vocabulary,
        )

    def process(self, samples: list[Sample]) -> None:
        words = attribute_words(self.params.attribute_vocabulary)
        for view in views_of(samples):
            rule = self.rule()
            per_model, view.record["floating_attributes"] = separate_attributes(view.record, words)
            view.record["objects"], view.record["floating_objects"] = merge(per_model, rule)
            view.record["voting"] = rule

    def provenance(self) -> dict[str, Any]:
        p = self.params
        return {
            "min_iou": p.min_iou,
            "min_dice": p.min_dice,
            "max_objects": p.max_objects,
            "attribute_vocabulary": p.attribute_vocabulary,
        }
