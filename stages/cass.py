"""The model half of CASS (see `stages.spectral` for the math): CLIP's dense patch features with
DINO's attention graphs distilled into CLIP's last attention block, on sliding square windows.

CLIP is an open_clip ViT (`stages.clip.load_clip`: CASS uses OpenAI's ViT-B/16). Its last block is
run the way CASS (after SCLIP/NACLIP) runs it for dense prediction: key-key attention graphs, no
residual and no MLP, then `ln_post` and the projection on every patch token. DINO is a transformers
`ViTModel` (`facebook/dino-vitb8` in CASS) by hub id or local path, or `tiny`: a 2-layer config
with random weights; its last layer's patch keys (hooked on the key projection) give its graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundmill.stages.base import ModelSpec, Resources
from groundmill.stages.clip import Clip
from groundmill.stages.models import device_for, local_path, seeded
from groundmill.stages.spectral import (
    distill_graphs,
    gaussian_neighbourhood,
    key_graphs,
    presence_adjusted_texts,
    presence_scores,
    rescale_range,
    window_starts,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CassSettings:
    k_eigen: int = 20  # eigenvalues per head spectrum (CASS)
    scale_factor: float = 10.0  # lambda: weight of the distilled DINO graph
    energy_threshold: float = 0.95  # low-rank energy
    gaussian_std: float = 5.0  # NACLIP's neighbourhood std, in patches
    presence_weight: float = 0.3  # gamma: the object-presence prior's share of the scores
    text_shift: float = 0.05  # how far a present class's text embedding moves to its patches
    cluster_threshold: float = 0.06  # Ward distance at which similar classes share a cluster
    logit_scale: float = 40.0  # softmax temperature of the final scores (CASS)


def tiny_dino(seed: int = 0) -> Any:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=64, patch_size=8)  # fmt: skip
    seeded(seed, "dino")
    return ViTModel(config, add_pooling_layer=False)


def load_dino(model_id: str, revision: str | None, resources: Resources, seed: int = 0) -> Any:
    """A DINO `ViTModel` (eval, float32) on the stage's device: hub id, local directory, or `tiny`."""
    from transformers import ViTModel

    spec = ModelSpec(id=model_id, revision=revision)
    if spec.is_random:
        model = tiny_dino(seed)
    else:
        path = local_path(spec)
        model = ViTModel.from_pretrained(str(path or model_id), revision=revision, add_pooling_layer=False)
    return model.to(device_for(spec, resources)).eval()


def last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of a ViT's last attention layer (`k_proj` or `key`, by transformers version)."""
    keys = [m for name, m in model.named_modules() if name.endswith(("k_proj", "attention.key"))]
    if not keys:
        raise ValueError(f"{type(model).__name__} has no attention key projection")
    return keys[-1]


@torch.inference_mode()
def dino_keys(model: Any, crop: Image.Image, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's last-layer patch keys of a crop, per head, resampled to CLIP's patch grid: (H, N, d)."""
    patch = model.config.patch_size
    size = (max(patch, crop.width // patch * patch), max(patch, crop.height // patch * patch))
    pixels = np.asarray(crop.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    device = next(model.parameters()).device
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1)).float()[None].to(device)
    captured: list[torch.Tensor] = []
    hook = last_key_projection(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(pixel_values=tensor, interpolate_pos_encoding=True)
    finally:
        hook.remove()
    heads = model.config.num_attention_heads
    keys = captured[0][0, 1:].float()  # patch tokens, CLS dropped: (M, D)
    gh, gw = size[1] // patch, size[0] // patch
    keys = keys.reshape(gh, gw, heads, -1).permute(2, 3, 0, 1)  # (H, d, gh, gw)
    keys = F.interpolate(keys, size=grid, mode="bilinear", align_corners=False)
    return keys.flatten(2).transpose(1, 2)  # (H, N, d)


def _pos_embedding(visual: Any, grid: tuple[int, int]) -> torch.Tensor:
    """CLIP's positional embedding resampled (bicubic) to a patch grid, CLS position first."""
    pos = visual.positional_embedding
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if (side, side) == grid:
        return pos
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.to(pos.dtype).flatten(2)[0].T])


def _qkv(attn: torch.nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-head query, key and value of the patch tokens (CLS dropped) of x (L, width): (H, N, d)."""
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(t[1:].reshape(t.shape[0] - 1, heads, -1).transpose(0, 1) for t in qkv)


@torch.inference_mode()
def dense_features(
    clip: Clip, dino: Any, crop: Image.Image, settings: CassSettings
) -> tuple[torch.Tensor, tuple[int, int]]:
    """L2-normalised CASS patch features (N, D) of one crop and its patch grid (h, w)."""
    visual = clip.model.visual
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    grid = (crop.height // patch, crop.width // patch)
    pixels = clip.preprocess(crop)[None].to(clip.device, clip.dtype)  # a window is CLIP's input size
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (1, N, width)
    cls = visual.class_embedding.to(x.dtype).expand(1, 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + _pos_embedding(visual, grid).to(x.dtype))
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    for block in blocks[:-1]:
        x = block(x)
    x = x[0] if batch_first else x[:, 0]  # (L, width)
    last = blocks[-1]
    _, k, v = _qkv(last.attn, last.ln_1(x))
    k, v = k.float(), v.float()
    dino_k = rescale_range(dino_keys(dino, crop, grid).to(k.device), k)
    graphs = distill_graphs(
        key_graphs(k), key_graphs(dino_k), settings.k_eigen, settings.scale_factor, settings.energy_threshold
    )
    graphs = graphs + gaussian_neighbourhood(*grid, settings.gaussian_std).to(graphs.device)
    out = (torch.softmax(graphs, -1) @ v).transpose(0, 1).reshape(len(x) - 1, -1)  # (N, width)
    out = F.linear(out.to(x.dtype), last.attn.out_proj.weight, last.attn.out_proj.bias)
    features = visual.ln_post(out) @ visual.proj
    return F.normalize(features.float(), dim=-1), grid


def crop_scores(
    clip: Clip,
    dino: Any,
    crop: Image.Image,
    texts: torch.Tensor,
    presence: torch.Tensor,
    clusters: np.ndarray,
    settings: CassSettings,
) -> torch.Tensor:
    """Class scores (C, h, w) of one crop at its pixel size."""
    patches, grid = dense_features(clip, dino, crop, settings)
    adjusted = presence_adjusted_texts(patches, texts, presence, clusters, settings.text_shift)
    scores = presence_scores(patches, adjusted, presence, settings.presence_weight)
    scores = scores.T.reshape(1, len(texts), *grid)
    return F.interpolate(scores, size=(crop.height, crop.width), mode="bilinear", align_corners=False)[0]


def window_side(clip: Clip) -> int:
    """CLIP's square input side: the sliding window's size."""
    size = clip.model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def working_size(
    width: int, height: int, short_side: int, crop: int, max_aspect: float = 4.0
) -> tuple[int, int]:
    """The (width, height) CASS runs at: the short side scaled to `short_side` (never below one
    window), the long side capped at `max_aspect` times the short one so that a 1 x 2000 strip costs
    a few windows, not hundreds."""
    short = max(short_side, crop)
    if width <= height:
        return short, max(short, min(round(height * short / width), round(short * max_aspect)))
    return max(short, min(round(width * short / height), round(short * max_aspect))), short


def segment(
    clip: Clip,
    dino: Any,
    image: Image.Image,
    texts: torch.Tensor,
    clusters: np.ndarray,
    settings: CassSettings,
    short_side: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(label map, probability of that label) at the image's size: CASS on square sliding windows of
    CLIP's input size (stride half a window) over the image at its `working_size`, averaged where
    windows overlap. Labels index `texts` (C, D, L2-normalised). The presence prior is CLIP's
    embedding of the whole image through its own preprocessing (CASS: of the whole image too)."""
    crop = window_side(clip)
    size = working_size(image.width, image.height, short_side, crop)
    resized = image.resize(size, Image.BICUBIC)
    texts = texts.to(clip.device)
    presence = torch.from_numpy(clip.encode_images([image])[0]).to(clip.device) @ texts.T
    total = torch.zeros((len(texts), size[1], size[0]))
    count = torch.zeros((1, size[1], size[0]))
    for y in window_starts(size[1], crop, crop // 2):
        for x in window_starts(size[0], crop, crop // 2):
            window = resized.crop((x, y, x + crop, y + crop))
            scores = crop_scores(clip, dino, window, texts, presence, clusters, settings)
            total[:, y : y + crop, x : x + crop] += scores.cpu()
            count[:, y : y + crop, x : x + crop] += 1
    probs = torch.softmax(settings.logit_scale * total / count, dim=0)
    best, labels = probs.max(0)
    labels = Image.fromarray(labels.numpy().astype(np.int32)).resize(image.size, Image.NEAREST)
    best = Image.fromarray(best.numpy().astype(np.float32)).resize(image.size, Image.NEAREST)
    return np.asarray(labels), np.asarray(best)
