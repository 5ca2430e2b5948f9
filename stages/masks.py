"""SAM2 masks for every kept box (objects and floating objects), one batched prompt call per image.

The stored mask is clipped to its box (rounded outwards), so every mask lies in its box; whether
SAM2's raw mask agreed with the prompt box (each edge within `box_tolerance` of the box's side) is
recorded as `mask_in_box`, which flags objects whose box and mask disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groundmill.schema import encode_mask
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.boxes import box_agrees, clip_mask_to_box
from groundmill.stages.sam2_models import load_image_predictor, predict_boxes

SOURCE = "SAM2"


def tight_box(mask: np.ndarray) -> list[float]:
    """xyxy pixel box of a bool mask's pixels (all zeros when empty), like schema.mask_bbox."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class Sam2Masks(Stage):
    name = "masks"
    provides = ("objects.segmentation",)
    requires = ("objects",)

    @dataclass
    class Params:
        box_tolerance: float = 0.15  # fraction of the box side an edge of the mask's box may differ by

    def setup(self) -> None:
        self.predictor = load_image_predictor(self.model_spec, self.resources, self.seed)

    def process(self, samples: list[Sample]) -> None:
        for view in views_of(samples):
            objs = view.record.get("objects", []) + view.record.get("floating_objects", [])
            if not objs:
                continue
            masks, ious = predict_boxes(self.predictor, view.image, [o["bbox"] for o in objs])
            for obj, mask, iou in zip(objs, masks, ious, strict=True):
                obj["mask_in_box"] = box_agrees(tight_box(mask), obj["bbox"], self.params.box_tolerance)
                obj["segmentation"] = encode_mask(clip_mask_to_box(mask, obj["bbox"]))
                obj["segmentation_source"] = SOURCE
                obj["predicted_iou"] = round(float(iou), 4)
