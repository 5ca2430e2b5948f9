"""SAM2 masks for every kept box (objects and floating objects), one batched prompt call per image.

The stored mask is clipped to its box (rounded outwards), so every mask lies in its box; whether
SAM2's raw mask agreed with the prompt box (each edge within `box_tolerance` of the box's side) is
recorded as `mask_in_box`, which flags objects whose box and mask disagree.

Re-voting (`revote`, on by default): the voting stage, which runs before any mask exists, splits the
detections by box IoU alone and writes its rule into the frame (`record["voting"]`). Here every
distinct raw detection box that votes (attribute-only boxes do not) gets a SAM2 mask, still in one
call per image; the same rule is applied again with mask Dice between the clipped masks (GranD: IoU
>= 0.65 and Dice >= 0.75), and the new objects and floating objects take the masks already computed
for their boxes. Re-voting rebuilds the objects from the detections, so run masks right after
voting. Frames without a voting rule (objects from elsewhere) just get masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from groundmill.schema import Object, VotingRule, encode_mask
from groundmill.stages.base import Sample, Stage, View, views_of
from groundmill.stages.boxes import Detection, box_agrees, clip_mask_to_box
from groundmill.stages.sam2_models import load_image_predictor, predict_boxes
from groundmill.stages.voting import Box, attribute_words, merge, separate_attributes

SOURCE = "SAM2"


def tight_box(mask: np.ndarray) -> list[float]:
    """xyxy pixel box of a bool mask's pixels (all zeros when empty), like schema.mask_bbox."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def distinct_boxes(per_model: dict[str, list[Detection]]) -> list[Box]:
    """Every raw detection box once, in detection order: identical boxes of two models share one SAM2
    prompt and so one mask."""
    return list(dict.fromkeys(tuple(d["bbox"]) for dets in per_model.values() for d in dets))


class Sam2Masks(Stage):
    name = "masks"
    provides = ("objects.segmentation", "objects", "floating_objects", "voting")
    requires = ("objects",)

    @dataclass
    class Params:
        box_tolerance: float = 0.15  # fraction of the box side an edge of the mask's box may differ by
        revote: bool = True  # re-apply the voting stage's rule with mask Dice (GranD's full rule)

    def setup(self) -> None:
        self.predictor = load_image_predictor(self.model_spec, self.resources, self.seed)

    def process(self, samples: list[Sample]) -> None:
        for view in views_of(samples):
            if self.params.revote and "voting" in view.record:
                self._revote(view)
            else:
                self._mask_objects(view)

    def _mask_objects(self, view: View) -> None:
        objs = view.record.get("objects", []) + view.record.get("floating_objects", [])
        if not objs:
            return
        masks, ious = predict_boxes(self.predictor, view.image, [o["bbox"] for o in objs])
        for obj, mask, iou in zip(objs, masks, ious, strict=True):
            self._assign(obj, mask, clip_mask_to_box(mask, obj["bbox"]), float(iou))

    def _revote(self, view: View) -> None:
        record = view.record
        # the detections that vote: attribute-only boxes (floating_attributes) get no mask
        per_model, _ = separate_attributes(record, attribute_words(record["voting"]["attribute_vocabulary"]))
        boxes = distinct_boxes(per_model)
        found: dict[Box, tuple[np.ndarray, np.ndarray, float]] = {}  # box -> (raw mask, clipped, iou)
        if boxes:
            masks, ious = predict_boxes(self.predictor, view.image, [list(b) for b in boxes])
            for b, m, iou in zip(boxes, masks, ious, strict=True):
                found[b] = (m, clip_mask_to_box(m, list(b)), float(iou))
        # Dice is taken between the clipped masks: the masks that are stored
        objects, floating = merge(per_model, record["voting"], {b: f[1] for b, f in found.items()})
        record["objects"], record["floating_objects"] = objects, floating
        record["voting"] = VotingRule(**{**record["voting"], "masks": True})
        for obj in objects + floating:
            self._assign(obj, *found[tuple(obj["bbox"])])  # an object keeps its lead detection's box

    def _assign(self, obj: Object, mask: np.ndarray, clipped: np.ndarray, iou: float) -> None:
        obj["mask_in_box"] = box_agrees(tight_box(mask), obj["bbox"], self.params.box_tolerance)
        obj["segmentation"] = encode_mask(clipped)
        obj["segmentation_source"] = SOURCE
        obj["predicted_iou"] = round(iou, 4)

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"revote": self.params.revote}
