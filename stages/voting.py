"""GranD's cross-model agreement: the detectors' boxes -> `objects` (a second model agrees) and
`floating_objects` (nobody agrees). Cheap logic, run as a Ray task; the rule is `boxes.vote`.

This stage runs before any mask exists, so it can only compare boxes. It writes the rule it applied
into each frame (`record["voting"]`, with `masks: false`); the masks stage, which prompts SAM2 with
every raw detection box, re-applies that same rule with mask Dice as well (GranD's full rule: box IoU
>= 0.65 and mask Dice >= 0.75) and sets `masks: true`. The thresholds are configured once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from groundmill.schema import Object, VotingRule
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.boxes import Detection, vote

Box = tuple[float, ...]


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
    provides = ("voting", "objects", "floating_objects")
    requires = ("detections",)
    uses_model = False

    @dataclass
    class Params:
        min_iou: float = 0.65  # GranD: box IoU >= 0.65 ...
        min_dice: float = 0.75  # ... and mask Dice >= 0.75 (applied when the masks stage re-votes)
        max_objects: int = 100  # per image, best first (objects before floating ones)

    def rule(self) -> VotingRule:
        p = self.params
        return VotingRule(min_iou=p.min_iou, min_dice=p.min_dice, max_objects=p.max_objects, masks=False)

    def process(self, samples: list[Sample]) -> None:
        for view in views_of(samples):
            rule = self.rule()
            view.record["objects"], view.record["floating_objects"] = merge(
                view.record.get("detections", {}), rule
            )
            view.record["voting"] = rule

    def provenance(self) -> dict[str, Any]:
        p = self.params
        return {"min_iou": p.min_iou, "min_dice": p.min_dice, "max_objects": p.max_objects}
