"""Automatic masks for what the detectors missed: SAM2's own `SAM2AutomaticMaskGenerator` (a grid of
point prompts, predicted-IoU and stability filtering, box NMS; `points_per_batch` prompts at a time
bound memory) on each image. A mask that no object or floating object covers (its best mask IoU
with them is below `max_iou`) becomes a floating object, labelled by CLIP zero-shot over the tag
vocabulary on its masked crop, with `segmentation_source: "SAM2-auto"` (the exhaustivity check of
the verifiers reads objects of that source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from groundmill.schema import RLE, FrameRecord, Object, decode_mask
from groundmill.stages.base import ModelSpec, Sample, Stage, views_of
from groundmill.stages.masks import tight_box
from groundmill.stages.stuff import next_free_id
from groundmill.stages.tagging import load_vocabulary

SOURCE = "SAM2-auto"


def rle_ious(masks: list[RLE], known: list[RLE]) -> np.ndarray:
    """(len(masks), len(known)) mask IoUs, computed on the RLEs (pycocotools; nothing decoded)."""
    if not masks or not known:
        return np.zeros((len(masks), len(known)))
    coco = [
        [{"size": list(r["size"]), "counts": r["counts"].encode("ascii")} for r in rles]
        for rles in (masks, known)
    ]
    return np.asarray(mask_utils.iou(coco[0], coco[1], [0] * len(known))).reshape(len(masks), len(known))


def uncovered(ious: np.ndarray, max_iou: float) -> list[int]:
    """Rows (new masks) of an IoU matrix whose best IoU with any known mask is below `max_iou`."""
    return [i for i, row in enumerate(ious) if not (row >= max_iou).any()]


def known_masks(frame: FrameRecord) -> list[RLE]:
    return [
        o["segmentation"]
        for g in ("objects", "floating_objects")
        for o in frame.get(g, [])
        if "segmentation" in o
    ]


def masked_crop(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The mask's box of the image with pixels outside the mask greyed, for CLIP to name."""
    x0, y0, x1, y1 = (int(v) for v in tight_box(mask))
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = 127
    return Image.fromarray(pixels[y0:y1, x0:x1])


def auto_object(
    obj_id: int, mask: np.ndarray, label: str, label_score: float, found: dict[str, Any]
) -> Object:
    """A floating object from one generator mask: its box, CLIP label, and SAM2's quality figures."""
    return Object(
        id=obj_id,
        bbox=tight_box(mask),
        labels=[label],
        attributes=[],
        score=round(label_score, 4),
        detectors=[SOURCE],
        segmentation=RLE(size=list(found["segmentation"]["size"]), counts=found["segmentation"]["counts"]),
        segmentation_source=SOURCE,
        predicted_iou=round(float(found["predicted_iou"]), 4),
    )


class Sam2AutoMasks(Stage):
    name = "auto_masks"
    provides = ("floating_objects.segmentation_source",)  # new floating objects, source "SAM2-auto"
    requires = ("objects",)

    @dataclass
    class Params:
        clip: str = "tiny"  # the open_clip model that names each new mask (stages.clip ids)
        vocabularies: list[str] = field(default_factory=lambda: ["coco", "extra"])
        prompts: list[str] = field(default_factory=lambda: ["a photo of a {}."])
        points_per_side: int = 32  # SAM's grid: points_per_side^2 prompts
        points_per_batch: int = 64  # prompts per forward pass: bounds memory
        pred_iou_thresh: float = 0.8
        stability_score_thresh: float = 0.95
        box_nms_thresh: float = 0.7
        multimask_output: bool = True  # SAM's three masks per point (False: one, a third of the work)
        min_area_frac: float = 0.001  # masks smaller than this share of the image are dropped
        max_iou: float = 0.5  # a mask overlapping a known object this much is that object
        max_new: int = 50  # new floating objects per image, largest first

    def setup(self) -> None:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        from groundmill.stages.clip import load_clip
        from groundmill.stages.sam2_models import build_sam2_model, fit_feature_sizes

        p = self.params
        model = build_sam2_model(self.model_spec, self.resources, self.seed)
        self.generator = SAM2AutomaticMaskGenerator(
            model,
            points_per_side=p.points_per_side,
            points_per_batch=p.points_per_batch,
            pred_iou_thresh=p.pred_iou_thresh,
            stability_score_thresh=p.stability_score_thresh,
            box_nms_thresh=p.box_nms_thresh,
            multimask_output=p.multimask_output,
            output_mode="coco_rle",  # full-size masks are compared and stored as RLE, never all decoded
        )
        fit_feature_sizes(self.generator.predictor)
        self.labels = load_vocabulary(p.vocabularies)
        self.clip = load_clip(ModelSpec(id=p.clip), self.resources, self.seed)
        per_prompt = [self.clip.encode_texts([t.format(w) for w in self.labels]) for t in p.prompts]
        mean = np.mean(per_prompt, axis=0)
        self.text_emb = mean / np.linalg.norm(mean, axis=1, keepdims=True)

    def new_masks(self, image: Image.Image, frame: FrameRecord) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """The generator's masks no known object covers, largest first, at most `max_new`."""
        import torch

        with torch.inference_mode():
            found = self.generator.generate(np.asarray(image.convert("RGB")))
        min_area = self.params.min_area_frac * image.width * image.height
        found = sorted((f for f in found if f["area"] >= max(1, min_area)), key=lambda f: -f["area"])
        ious = rle_ious([f["segmentation"] for f in found], known_masks(frame))
        keep = uncovered(ious, self.params.max_iou)[: self.params.max_new]
        return [(decode_mask(found[i]["segmentation"]), found[i]) for i in keep]

    def process(self, samples: list[Sample]) -> None:
        from groundmill.stages.clip import zero_shot_probs

        for view in views_of(samples):
            new = self.new_masks(view.image, view.record)
            if not new:
                continue
            emb = self.clip.encode_images([masked_crop(view.image, m) for m, _ in new])
            probs = zero_shot_probs(emb, self.text_emb, self.clip.logit_scale)
            first = next_free_id(view.record)
            objects = [
                auto_object(first + i, m, self.labels[int(np.argmax(pr))], float(np.max(pr)), f)
                for i, ((m, f), pr) in enumerate(zip(new, probs, strict=True))
            ]
            view.record.setdefault("floating_objects", []).extend(objects)

    def provenance(self) -> dict[str, Any]:
        from groundmill.stages.hub import random_weights

        info = super().provenance()
        info.update(
            clip=self.params.clip, max_iou=self.params.max_iou, points_per_side=self.params.points_per_side
        )
        info["random_weights"] = info["random_weights"] or random_weights(ModelSpec(id=self.params.clip))
        return info
