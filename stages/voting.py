"""GranD's cross-model agreement: the detectors' boxes -> `objects` (a second model agrees) and
`floating_objects` (nobody agrees). Cheap logic, run as a Ray task; the rule is `boxes.vote`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.boxes import vote


class BoxVoting(Stage):
    name = "voting"
    provides = ("objects", "floating_objects")
    requires = ("detections",)
    uses_model = False

    @dataclass
    class Params:
        min_iou: float = 0.65  # GranD: box IoU >= 0.65 ...
        min_dice: float = 0.75  # ... and mask Dice >= 0.75 where both detections carry masks
        max_objects: int = 100  # per image, best first (objects before floating ones)

    def process(self, samples: list[Sample]) -> None:
        p = self.params
        for view in views_of(samples):
            objects, floating = vote(view.record.get("detections", {}), p.min_iou, p.min_dice)
            view.record["objects"] = objects[: p.max_objects]
            view.record["floating_objects"] = floating[: max(0, p.max_objects - len(objects))]

    def provenance(self) -> dict[str, Any]:
        return {"min_iou": self.params.min_iou, "min_dice": self.params.min_dice}
