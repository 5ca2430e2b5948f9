"""Monocular depth through transformers (`AutoModelForDepthEstimation`: Depth Anything, DPT, ...):
a normalised depth per object (median inside its mask) and GranD's depth layers.

Depth Anything and DPT predict relative inverse depth (larger = nearer); `larger_is_nearer` turns it
into the record's convention, 0 near .. 1 far, normalised per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from groundmill.media import pad_to_aspect
from groundmill.schema import decode_mask
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.models import device_for, dtype_for, local_path, seeded

TINY_IMAGE_SIZE = 126  # a multiple of the 14-px DINOv2 patch
LAYERS = ("immediate foreground", "foreground", "midground", "background")


def normalise_depth(pred: np.ndarray, larger_is_nearer: bool) -> np.ndarray:
    """A model's depth map -> 0 (nearest pixel) .. 1 (farthest pixel); a flat map is all 0."""
    lo, hi = float(pred.min()), float(pred.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(pred, dtype=np.float32)
    scaled = (pred - lo) / (hi - lo)
    return (1.0 - scaled if larger_is_nearer else scaled).astype(np.float32)


def object_depth(depth: np.ndarray, mask: np.ndarray | None, bbox: list[float]) -> float:
    """Median normalised depth inside the mask; the box region when the mask is missing or empty."""
    if mask is None or not mask.any():
        x0, y0 = int(bbox[0]), int(bbox[1])
        x1, y1 = max(x0 + 1, int(np.ceil(bbox[2]))), max(y0 + 1, int(np.ceil(bbox[3])))
        return float(np.median(depth[y0:y1, x0:x1]))
    return float(np.median(depth[mask]))


def depth_layer(depth: float, cutoffs: list[float]) -> str:
    """GranD's layer for a normalised depth: below cutoffs[0], [1], [2], or beyond."""
    for name, cut in zip(LAYERS, cutoffs, strict=False):
        if depth < cut:
            return name
    return LAYERS[len(cutoffs)]


MIN_DEPTH_SIDE = 32  # pixels: two patches of 14 and more, after the processor's rounding


class Depth(Stage):
    name = "depth"
    provides = ("objects.depth",)
    requires = ("objects",)

    @dataclass
    class Params:
        layer_cutoffs: list[float] = field(default_factory=lambda: [0.1, 0.6, 0.85])  # GranD's cut-offs
        larger_is_nearer: bool = True  # Depth Anything / DPT / MiDaS predict inverse depth

    def setup(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        if len(self.params.layer_cutoffs) != len(LAYERS) - 1:
            raise ValueError(f"params.layer_cutoffs: need {len(LAYERS) - 1} values")
        spec = self.model_spec
        self.device = device_for(spec, self.resources)
        self.dtype = dtype_for(spec, self.device)
        if spec.is_random:
            self.model, self.processor = _tiny_depth_anything(self.seed)
        else:
            source = local_path(spec) or spec.id
            self.model = AutoModelForDepthEstimation.from_pretrained(source, revision=spec.revision)
            self.processor = AutoImageProcessor.from_pretrained(source, revision=spec.revision)
        self.model = self.model.to(self.device, self.dtype).eval()

    @torch.inference_mode()
    def predict(self, images: list) -> list[np.ndarray]:
        """One depth map per image at the image's size, in the model's own units. One image per forward:
        depth processors keep each image's aspect ratio, so differently shaped images do not stack."""
        maps = []
        for image in images:
            # a picture of a few pixels is also padded: processors misread its channels, maps collapse
            padded = pad_to_aspect(image, self.max_aspect, min_side=MIN_DEPTH_SIDE)
            inputs = self.processor(images=[padded], return_tensors="pt").to(self.device)
            out = self.model(pixel_values=inputs["pixel_values"].to(self.dtype))
            post = self.processor.post_process_depth_estimation(
                out, target_sizes=[(padded.height, padded.width)]
            )
            depth = post[0]["predicted_depth"].float().cpu().numpy().reshape(padded.height, padded.width)
            maps.append(depth[: image.height, : image.width])
        return maps

    @property
    def max_aspect(self) -> float:
        """The processor fits the side nearest its size and rounds to a patch multiple: a side thinner
        than two patches after that would vanish, so more elongated pictures are padded first."""
        size = self.processor.size
        side = min(size.get("height") or 518, size.get("width") or 518)
        return max(1.0, side / (2 * (getattr(self.processor, "ensure_multiple_of", 1) or 1)))

    def process(self, samples: list[Sample]) -> None:
        views = views_of(samples)
        for view, pred in zip(views, self.predict([v.image for v in views]), strict=True):
            depth = normalise_depth(pred, self.params.larger_is_nearer)
            for obj in view.record.get("objects", []) + view.record.get("floating_objects", []):
                mask = decode_mask(obj["segmentation"]) if "segmentation" in obj else None
                obj["depth"] = round(object_depth(depth, mask, obj["bbox"]), 4)
                obj["depth_layer"] = depth_layer(obj["depth"], self.params.layer_cutoffs)


def _tiny_depth_anything(seed: int):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor

    seeded(seed, "depth")
    config = DepthAnythingConfig(
        backbone_config={
            "model_type": "dinov2",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 14,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
            "reshape_hidden_states": False,
        },
        reassemble_hidden_size=32,
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    processor = DPTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
    )
    return DepthAnythingForDepthEstimation(config), processor
