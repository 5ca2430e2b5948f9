"""SAM2's image encoder (Hiera trunk + FPN neck), prompt encoder and mask decoder, from the `sam2` package.

The encoder is instantiated from one of sam2's own hydra configs (``configs/sam2.1/sam2.1_hiera_l.yaml``
...) plus hydra overrides, so a tiny Hiera is the same class as hiera-large with smaller numbers. The
prompt encoder and mask decoder are built as ``SAM2Base._build_sam_heads`` builds them (sam2 1.1.0,
``sam2/modeling/sam2_base.py``), so a SAM2 checkpoint's ``image_encoder.*``, ``sam_prompt_encoder.*`` and
``sam_mask_decoder.*`` weights load into them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import sam2  # noqa: F401  (initialises hydra's config search path to sam2's configs)
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import Tensor, nn

from groundmill.model.config import DecoderConfig, VisionConfig

# SAM2's input normalisation (ImageNet mean / std on 0-255 pixels, sam2/utils/transforms.py).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# sam2 checkpoint prefixes -> our module names.
PREFIXES = {
    "image_encoder.": "vision.image_encoder.",
    "sam_prompt_encoder.": "prompt_encoder.",
    "sam_mask_decoder.": "mask_decoder.",
}


def sam2_config(v: VisionConfig) -> DictConfig:
    """The sam2 hydra config named by `v.sam2_config` with `v.overrides` applied and the image size set."""
    return compose(config_name=v.sam2_config, overrides=[*v.overrides, f"++model.image_size={v.image_size}"])


class SamEncoder(nn.Module):
    """uint8 (N,3,S,S) frames -> the embedding (N,C,S/16,S/16) and the two finer FPN levels (S/4, S/8)
    that SAM2's mask decoder takes as high-resolution features."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        cfg = sam2_config(v)
        self.image_encoder = instantiate(cfg.model.image_encoder, _recursive_=True)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.image_encoder.neck.d_model

    def forward(self, frames: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.image_encoder((frames.float() - self.mean) / self.std)
        fpn = out["backbone_fpn"]
        return fpn[-1], fpn[:2]


def sam_heads(dim: int, v: VisionConfig, d: DecoderConfig) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM2's prompt encoder and mask decoder at width `dim` (the neck's d_model), high-res path on."""
    grid = v.image_size // 16  # SAM2's backbone_stride
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                           input_image_size=(v.image_size, v.image_size), mask_in_chans=16)  # fmt: skip
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=d.depth, embedding_dim=dim, mlp_dim=d.mlp_dim, num_heads=d.heads),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=d.iou_hidden,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
    )
    return prompt, decoder


def resolve_sam2_checkpoint(name: str) -> Path:
    """A local .pt / .safetensors file, or a hub id of sam2's table (`facebook/sam2.1-hiera-large`)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if name not in HF_MODEL_ID_TO_FILENAMES:
        raise FileNotFoundError(
            f"sam2 checkpoint {name!r}: no such file, and not one of {sorted(HF_MODEL_ID_TO_FILENAMES)}"
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=name, filename=HF_MODEL_ID_TO_FILENAMES[name][1]))


def sam2_state_dict(name: str) -> dict[str, Tensor]:
    """A sam2 checkpoint's encoder / prompt encoder / mask decoder weights under our module names."""
    path = resolve_sam2_checkpoint(name)
    if path.suffix == ".safetensors":
        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        raw = raw.get("model", raw)
    out = {}
    for key, value in raw.items():
        for theirs, ours in PREFIXES.items():
            if key.startswith(theirs):
                out[ours + key[len(theirs) :]] = value
    return out
