"""LM cross-entropy + mask sigmoid BCE + Dice (Sa2VA / VideoLISA weights 1.0 / 2.0 / 0.5 by default).

Each [SEG] decodes exactly one mask and is paired with its phrase's mask by order, so no matching is
needed; the generic head's N queries are matched to the instances (Hungarian, `generic_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from groundmill.model.config import LossConfig


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over masks of 1 - soft Dice, each (..., H, W) mask on its own."""
    p, t = logits.sigmoid().flatten(-2), target.flatten(-2)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).mean()


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def pairwise_costs(mask_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean sigmoid BCE and Dice loss of every prediction (N,H,W) against every target (K,H,W)."""
    x, t = mask_logits.flatten(1), target.flatten(1)
    hw = x.shape[1]
    bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / hw
    p = x.sigmoid()
    dice = 1 - (2 * p @ t.T + 1) / (p.sum(1, keepdim=True) + t.sum(1)[None] + 1)
    return bce, dice


def generic_loss(outputs: list[tuple[Tensor, Tensor]], masks: Tensor, classes: Tensor, rows: Tensor,
                 w: LossConfig, referring: bool = False) -> dict[str, Tensor]:  # fmt: skip
    """X2SAM's generic head: Hungarian-matched cls + BCE + Dice (Mask2Former's matcher and criterion,
    ``mask2former/modeling/matcher.py``, ``criterion.py``; scipy's linear_sum_assignment), averaged over
    rows. masks (K,S,S) instance targets, or (K,T,S,S) over a clip; classes (K,) category index within its
    row; rows (K,) their row among the rows of `outputs`.

    `referring`: each row is one [SEG] with at most one instance. The matching then reads the masks only (a
    class cost lets one query claim every row before any query has learnt an object, and that query's mask
    cannot follow the words), and a listwise term ranks the matched query first among all queries: the
    per-query class loss alone barely tells the target from its look-alikes, which are "no object" at
    weight `no_object`."""
    cls_l, bce_l, dice_l, rank_l = [], [], [], []
    for r, (class_logits, mask_logits) in enumerate(outputs):
        mine = rows == r
        mine_masks = masks[mine].float()  # (K,S,S) or (K,T,S,S): frames are matched together
        size = mask_logits.shape[-2:]
        target = F.interpolate(mine_masks.flatten(0, -3)[:, None], size=size, mode="area").reshape(
            *mine_masks.shape[:-2], *size
        )
        target_cls = torch.full((len(class_logits),), class_logits.shape[1] - 1, device=class_logits.device)
        weight = torch.ones(class_logits.shape[1], device=class_logits.device)
        weight[-1] = w.no_object
        if len(target):
            bce, dice = pairwise_costs(mask_logits.float(), target)
            cost = bce * w.bce + dice * w.dice
            if not referring:
                cost = cost - class_logits.float().softmax(-1)[:, classes[mine]] * w.cls
            q, k = (
                torch.as_tensor(i, device=target.device) for i in linear_sum_assignment(cost.detach().cpu())
            )
            target_cls[q] = classes[mine][k]
            bce_l.append(F.binary_cross_entropy_with_logits(mask_logits[q].float(), target[k]))
            dice_l.append(dice_loss(mask_logits[q].float(), target[k]))
            if referring:
                rank_l.append(F.cross_entropy(class_logits[:, 0].float()[None], q))
        cls_l.append(F.cross_entropy(class_logits.float(), target_cls, weight=weight))
    zero = outputs[0][0].sum() * 0
    cls = torch.stack(cls_l).mean()
    bce = torch.stack(bce_l).mean() if bce_l else zero
    dice = torch.stack(dice_l).mean() if dice_l else zero
    rank = torch.stack(rank_l).mean() if rank_l else zero
    return {
        "loss": w.cls * (cls + rank) + w.bce * bce + w.dice * dice,
        "cls": cls,
        "generic_bce": bce,
        "generic_dice": dice,
        **({"rank": rank} if referring else {}),
    }


def total_loss(out: dict[str, Tensor], batch: dict[str, Tensor], w: LossConfig) -> dict[str, Tensor]:
    """LM + [SEG] mask losses, plus the generic head's matched losses when the batch has generic rows."""
    ce = lm_loss(out["logits"], batch["labels"])
    losses = {"ce": ce}
    total = w.ce * ce
    logits, target = out["mask_logits"].float(), batch["masks"]
    if "seg_queries" in out:  # X2SAM's query head: each [SEG] is its own row's one category
        rows = target.flatten(1).any(1).nonzero()[:, 0]  # an empty target: every query is no object
        g = generic_loss(out["seg_queries"], target[rows], torch.zeros_like(rows), rows, w, referring=True)
        total = total + g.pop("loss")
        losses.update(
            {"seg_cls": g["cls"], "seg_rank": g["rank"], "bce": g["generic_bce"], "dice": g["generic_dice"]}
        )
    elif len(target):
        losses["bce"] = F.binary_cross_entropy_with_logits(logits, target)
        losses["dice"] = dice_loss(logits, target)
        total = total + w.bce * losses["bce"] + w.dice * losses["dice"]
    if "generic" in out:
        g = generic_loss(
            out["generic"], batch["instance_masks"], batch["instance_class"], batch["instance_row"], w
        )
        total = total + g.pop("loss")
        losses.update(g)
    return {"loss": total, **losses}
