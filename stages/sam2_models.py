"""SAM2 model loading for the mask stage (image predictor) and video tracking (video predictor).

Model ids:
- a hub id (`facebook/sam2.1-hiera-large`, ...): the checkpoint file sam2's `from_pretrained` downloads
  (`sam2.1_hiera_large.pt`, named in sam2's `HF_MODEL_ID_TO_FILENAMES`) through `hf_hub_download`,
  built with the repo's own hydra config beside it (`sam2.1_hiera_l.yaml`) when the snapshot has one,
  else with sam2's packaged config of that name: the same files and config as `from_pretrained`, and
  a snapshot that carries a smaller config (the offline hub fixture) builds that;
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


def _hub_config(spec: ModelSpec) -> tuple[Any, Path]:
    """(hydra config, checkpoint) of a SAM2 hub id, from the files sam2's `from_pretrained` uses."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from hydra import compose
    from omegaconf import OmegaConf
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if spec.id not in HF_MODEL_ID_TO_FILENAMES:
        known = ", ".join(sorted(HF_MODEL_ID_TO_FILENAMES))
        raise ValueError(f"SAM2 model id {spec.id!r} is not one of sam2's hub ids ({known}) nor a local path")
    config_name, ckpt_name = HF_MODEL_ID_TO_FILENAMES[spec.id]
    ckpt = Path(hf_hub_download(spec.id, ckpt_name, revision=spec.revision))
    try:
        return OmegaConf.load(hf_hub_download(spec.id, Path(config_name).name, revision=spec.revision)), ckpt
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return compose(config_name=config_name), ckpt


def build_sam2_model(spec: ModelSpec, resources: Resources, seed: int = 0, video: bool = False) -> Any:
    """A SAM2Base (or SAM2VideoPredictor when `video`) for a spec, on its device, eval."""
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
        cfg, ckpt = _hub_config(spec)
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

    return fit_feature_sizes(SAM2ImagePredictor(build_sam2_model(spec, resources, seed)))


def load_video_predictor(spec: ModelSpec, resources: Resources, seed: int = 0) -> Any:
    """A `sam2.sam2_video_predictor.SAM2VideoPredictor` for `spec` (init_state / add_new_points_or_box /
    propagate_in_video)."""
    return build_sam2_model(spec, resources, seed, video=True)


@torch.inference_mode()
def predict_box_logits(predictor: Any, image: Any, boxes: list[list[float]]) -> tuple[Any, Any]:
    """Mask logits (N, H, W) float32 and predicted IoUs (N,) for xyxy `boxes` on one PIL image, one
    batched call; the mask is `logits > 0` (SAM2's mask threshold)."""
    import numpy as np

    predictor.set_image(image)
    if not boxes:
        h, w = image.height, image.width
        return np.zeros((0, h, w), dtype=np.float32), np.zeros((0,), dtype=np.float32)
    logits, ious, _ = predictor.predict(
        box=np.asarray(boxes, dtype=np.float32), multimask_output=False, return_logits=True
    )
    if logits.ndim == 3:  # one box: (1, H, W) -> (1, 1, H, W)
        logits, ious = logits[None], ious[None]
    return logits[:, 0].astype(np.float32), ious[:, 0]


def predict_boxes(predictor: Any, image: Any, boxes: list[list[float]]) -> tuple[Any, Any]:
    """Masks (N, H, W) bool and predicted IoUs (N,) for xyxy `boxes` on one PIL image, one batched call."""
    logits, ious = predict_box_logits(predictor, image, boxes)
    return logits > 0, ious
