"""SAM2 model loading for the mask stage (image predictor) and video tracking (video predictor).

Model ids:
- a hub id (`facebook/sam2.1-hiera-tiny`, ...): the sam2 package's own `from_pretrained`;
- a local checkpoint: a `.pt` file named like an official one (`sam2.1_hiera_tiny.pt`, its config is
  taken from sam2's table), or a directory holding one `*.yaml` hydra config and one `*.pt` file.
  Checkpoints load with `torch.load(weights_only=True)` (sam2's own loader);
- `tiny`: the real SAM2 model class from sam2's hiera-t config at a small `image_size`
  (`TINY_IMAGE_SIZE`) with seeded random weights.

sam2 is installed without its `_C` extension, so the post-processing that needs it (hole filling,
dynamic multimask) is never switched on. `SAM2ImagePredictor` hard-codes the backbone feature sizes of
a 1024-px model; :func:`fit_feature_sizes` derives them from the model's configured image size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from groundmill.stages.base import ModelSpec, Resources
from groundmill.stages.models import device_for, local_path, seeded

TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
TINY_IMAGE_SIZE = 256  # multiple of 32 (Hiera's total stride); 1024 is SAM2's trained size
_VIDEO_TARGET = "sam2.sam2_video_predictor.SAM2VideoPredictor"


def image_size_overrides(image_size: int) -> list[str]:
    """Hydra overrides that run a SAM2 config at another input size (memory attention's RoPE grid too)."""
    if image_size % 32:
        raise ValueError(f"SAM2 image_size must be a multiple of 32, got {image_size}")
    grid = image_size // 16  # the stride-16 feature map the memory attention works on
    rope = f"[{grid},{grid}]"
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes={rope}",
        f"++model.memory_attention.layer.cross_attention.feat_sizes={rope}",
    ]


def _local_config(path: Path) -> tuple[Any, Path]:
    """(hydra config, checkpoint) for a local `.pt` file or a directory with one `*.yaml` and one `*.pt`."""
    from hydra import compose
    from omegaconf import OmegaConf
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if path.is_file():
        known = {ckpt: cfg for cfg, ckpt in HF_MODEL_ID_TO_FILENAMES.values()}
        if path.name not in known:
            raise ValueError(
                f"SAM2 checkpoint {path}: unknown file name; use a directory with its *.yaml config"
            )
        return compose(config_name=known[path.name]), path
    configs, ckpts = sorted(path.glob("*.yaml")), sorted(path.glob("*.pt"))
    if len(configs) != 1 or len(ckpts) != 1:
        raise ValueError(
            f"SAM2 model dir {path}: need exactly one *.yaml and one *.pt, found {configs + ckpts}"
        )
    return OmegaConf.load(configs[0]), ckpts[0]


def build_sam2_model(spec: ModelSpec, resources: Resources, seed: int = 0, video: bool = False) -> Any:
    """A SAM2Base (or SAM2VideoPredictor when `video`) for a `tiny` or local spec, on its device, eval."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sam2.build_sam import _load_checkpoint

    if spec.is_random:
        cfg = compose(config_name=TINY_CONFIG, overrides=image_size_overrides(TINY_IMAGE_SIZE))
        ckpt = None
    elif (path := local_path(spec)) is not None:
        cfg, ckpt = _local_config(path)
    else:
        raise ValueError(f"{spec.id!r} is neither 'tiny' nor a local path (hub ids use from_pretrained)")
    if video:
        cfg = OmegaConf.merge(cfg, {"model": {"_target_": _VIDEO_TARGET}})
    OmegaConf.resolve(cfg)
    seeded(seed, "sam2-video" if video else "sam2")
    model = instantiate(cfg.model, _recursive_=True)
    _load_checkpoint(model, str(ckpt) if ckpt else None)  # torch.load(weights_only=True)
    return model.to(device_for(spec, resources)).eval()


def fit_feature_sizes(predictor: Any) -> Any:
    """Set the image predictor's backbone feature sizes (strides 4, 8, 16) from its model's image size."""
    size = predictor.model.image_size
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor


def load_image_predictor(spec: ModelSpec, resources: Resources, seed: int = 0) -> Any:
    """A `sam2.sam2_image_predictor.SAM2ImagePredictor` for `spec`, usable at any configured image size."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    if spec.is_random or local_path(spec) is not None:
        predictor = SAM2ImagePredictor(build_sam2_model(spec, resources, seed))
    else:
        device = str(device_for(spec, resources))
        predictor = SAM2ImagePredictor.from_pretrained(spec.id, device=device, apply_postprocessing=False)
    return fit_feature_sizes(predictor)


def load_video_predictor(spec: ModelSpec, resources: Resources, seed: int = 0) -> Any:
    """A `sam2.sam2_video_predictor.SAM2VideoPredictor` for `spec` (init_state / add_new_points_or_box /
    propagate_in_video)."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    if spec.is_random or local_path(spec) is not None:
        return build_sam2_model(spec, resources, seed, video=True)
    device = str(device_for(spec, resources))
    return SAM2VideoPredictor.from_pretrained(spec.id, device=device, apply_postprocessing=False)


@torch.inference_mode()
def predict_boxes(predictor: Any, image: Any, boxes: list[list[float]]) -> tuple[Any, Any]:
    """Masks (N, H, W) bool and predicted IoUs (N,) for xyxy `boxes` on one PIL image, one batched call."""
    import numpy as np

    predictor.set_image(image)
    if not boxes:
        h, w = image.height, image.width
        return np.zeros((0, h, w), dtype=bool), np.zeros((0,), dtype=np.float32)
    masks, ious, _ = predictor.predict(box=np.asarray(boxes, dtype=np.float32), multimask_output=False)
    if masks.ndim == 3:  # one box: (1, H, W) -> (1, 1, H, W)
        masks, ious = masks[None], ious[None]
    return masks[:, 0] > 0, ious[:, 0]
