"""LM cross-entropy + mask sigmoid BCE + Dice (Sa2VA / VideoLISA weights 1.0 / 2.0 / 0.5 by default).

Each [SEG] decodes exactly one mask and is paired with its phrase's mask by order, so no Hungarian
matching is needed (it would be with several learned queries per [SEG], as in X2SAM's Mask2Former head).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from groundmill.model.config import LossConfig


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over masks of 1 - soft Dice, each (..., H, W) mask on its own."""
    p, t = logits.sigmoid().flatten(-2), target.flatten(-2)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).mean()


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def total_loss(out: dict[str, Tensor], batch: dict[str, Tensor], w: LossConfig) -> dict[str, Tensor]:
    ce = lm_loss(out["logits"], batch["labels"])
    logits, target = out["mask_logits"].float(), batch["masks"]
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = dice_loss(logits, target)
    return {"loss": w.ce * ce + w.bce * bce + w.dice * dice, "ce": ce, "bce": bce, "dice": dice}
