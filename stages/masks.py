"""SAM2 masks for every raw detection, one batched box-prompt call per image, before voting.

Data flows one way: detection -> masks -> voting. Each distinct detection box of a frame without a
mask of its own (a segmenting detector's) gets one SAM2 mask (identical boxes of two models share the prompt and so the mask), clipped to its box
(rounded outwards) so every stored mask lies in its box. Whether SAM2's raw mask agreed with the
prompt box (each edge within `box_tolerance` of the box's side) is recorded as `mask_in_box`, and
SAM's stability score of the mask's logits (IoU at thresholds -delta and +delta) as `stability_score`.
The masks are written onto the detections (`DetectionMask` fields); the voting stage then applies
GranD's rule once, box IoU and mask Dice together, and moves each mask to the object it leads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groundmill.schema import encode_mask
from groundmill.stages.base import Sample, Stage, View, views_of
from groundmill.stages.boxes import Box, Detection, box_agrees, clip_mask_to_box
from groundmill.stages.mask_verification import stability_score
from groundmill.stages.sam2_models import load_image_predictor, predict_box_logits

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


def mask_fields(logits: np.ndarray, box: list[float], iou: float, tolerance: float, delta: float) -> dict:
    """What a detection (and later its object) stores of its SAM2 mask, in the record's key order."""
    raw = logits > 0
    return {
        "mask_in_box": box_agrees(tight_box(raw), box, tolerance),
        "segmentation": encode_mask(clip_mask_to_box(raw, box)),
        "segmentation_source": SOURCE,
        "predicted_iou": round(iou, 4),
        "stability_score": round(stability_score(logits, delta), 4),
    }


class Sam2Masks(Stage):
    name = "masks"
    provides = ("detections.segmentation",)
    requires = ("detections",)

    @dataclass
    class Params:
        box_tolerance: float = 0.15  # fraction of the box side an edge of the mask's box may differ by
        stability_delta: float = 1.0  # logit offset of SAM's stability score (its default)

    def setup(self) -> None:
        self.predictor = load_image_predictor(self.model_spec, self.resources, self.seed)

    def process(self, samples: list[Sample]) -> None:
        for view in views_of(samples):
            self._mask_detections(view)

    def _mask_detections(self, view: View) -> None:
        # A detector that segments (Mask2Former, ...) brought its own mask, as GranD's EVA did.
        unmasked = {
            m: [d for d in dets if "segmentation" not in d]
            for m, dets in view.record.get("detections", {}).items()
        }
        boxes = distinct_boxes(unmasked)
        if not boxes:
            return
        logits, ious = predict_box_logits(self.predictor, view.image, [list(b) for b in boxes])
        p = self.params
        found = {
            b: mask_fields(m, list(b), float(iou), p.box_tolerance, p.stability_delta)
            for b, m, iou in zip(boxes, logits, ious, strict=True)
        }
        for dets in unmasked.values():
            for d in dets:
                d.update(found[tuple(d["bbox"])])
