"""open_clip models for the zero-shot stages (tagging, scene category, attributes and labels).

Model ids: `tiny` (a 3M-parameter config shipped here, random weights), `ARCH@PRETRAINED`
(open_clip's own names, e.g. `ViT-B-32@laion2b_s34b_b79k`), a hub id (`org/repo`, loaded through
open_clip's `hf-hub:`), or a local directory holding `open_clip_config.json` and weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from groundmill.stages.base import ModelSpec, Resources
from groundmill.stages.models import device_for, dtype_for, local_path, seeded

TINY_ARCH = "groundmill-tiny-clip"
_CONFIG_DIR = Path(__file__).parent / "clip_configs"


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings, (N, D)."""
        if not images:
            return np.zeros((0, self.model.visual.output_dim), dtype=np.float32)
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        emb = self.model.encode_image(pixels).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings, (N, D)."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            emb = self.model.encode_text(tokens).float()
            chunks.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def load_clip(spec: ModelSpec, resources: Resources, seed: int = 0) -> Clip:
    import open_clip

    device = device_for(spec, resources)
    dtype = dtype_for(spec, device)
    if spec.is_random:
        open_clip.add_model_config(_CONFIG_DIR)
        seeded(seed, TINY_ARCH)
        name, pretrained = TINY_ARCH, None
    elif (path := local_path(spec)) is not None:
        name, pretrained = f"local-dir:{path}", None
    elif "@" in spec.id:
        name, pretrained = spec.id.split("@", 1)
    else:
        name, pretrained = f"hf-hub:{spec.id.removeprefix('hf-hub:')}", None
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model = model.to(dtype).eval()
    return Clip(model, preprocess, open_clip.get_tokenizer(name), device, dtype)


def zero_shot_probs(image_emb: np.ndarray, text_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """CLIP's zero-shot class probabilities: softmax over scaled cosine similarities, (N, C)."""
    logits = logit_scale * image_emb @ text_emb.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)
