"""Replace an object's SAM2 mask by the x2sam stage's where a verifier's score prefers it.

The rule is one configurable comparison per object: the object's score at `score_field` (a dotted
path into the object, e.g. `verification.score`, the per-object verdict a verifier writes; or
`predicted_iou`, SAM2's own estimate) is below `replace_below`, and the best x2sam mask naming that
object alone scores at least `min_x2sam_score`. Then the x2sam mask becomes the object's
`segmentation` (`segmentation_source: x2sam`) and the replaced mask is kept under `replaced`. An
object without that score is left alone unless `replace_unscored`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from groundmill.schema import FrameRecord, Object
from groundmill.stages.base import Sample, Stage, views_of


def score_at(obj: Object, dotted: str) -> float | None:
    value: Any = obj
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class PreferMasks(Stage):
    name = "prefer_masks"
    provides = ("objects.segmentation",)
    requires = ("objects", "x2sam")
    uses_model = False
    uses_pixels = False

    @dataclass
    class Params:
        score_field: str = "verification.score"
        replace_below: float = 0.5
        min_x2sam_score: float = 0.5
        replace_unscored: bool = False

    def choose(self, frame: FrameRecord) -> None:
        p = self.params
        best: dict[int, dict[str, Any]] = {}
        for entry in frame.get("x2sam", []):
            if len(entry["object_ids"]) == 1 and entry["score"] >= p.min_x2sam_score:
                oid = entry["object_ids"][0]
                if oid not in best or entry["score"] > best[oid]["score"]:
                    best[oid] = entry
        for obj in frame.get("objects", []):
            new = best.get(obj["id"])
            score = score_at(obj, p.score_field)
            worse = score < p.replace_below if score is not None else p.replace_unscored
            if new is None or not worse or "segmentation" not in obj:
                continue
            reason = f"{p.score_field} {score} < {p.replace_below}" if score is not None else "unscored"
            obj["replaced"] = {"segmentation": obj["segmentation"],
                               "segmentation_source": obj.get("segmentation_source", ""), "reason": reason}  # fmt: skip
            obj["segmentation"] = new["segmentation"]
            obj["segmentation_source"] = new["segmentation_source"]

    def process(self, samples: list[Sample]) -> None:
        for view in views_of(samples):
            self.choose(view.record)
