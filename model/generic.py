"""X2SAM's generic / open-vocabulary segmentation head: N mask queries over SAM2 features, classified
against the categories' `[SEG]` embeddings, trained with Hungarian matching (model/losses.py:
generic_loss), evaluated with COCO mask AP per category.

A generic row's answer names its categories, each followed by a `[SEG]`: "<p> red circle </p> [SEG] ,
<p> blue square </p> [SEG] ."; those `[SEG]` states are the class embeddings, the extra last class is
"no object".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groundmill.model.metrics import mask_ap


class GenericHead(nn.Module):
    """Queries -> (class logits over the row's categories + no-object, mask logits at stride 4). Over a clip
    the queries attend to every frame at once, so one query is one object through time, with its motion
    (Mask2Former-VIS); each frame's mask is that query's embedding against the frame's pixels."""

    def __init__(self, dim: int, hidden: int, queries: int, layers: int, heads: int):
        super().__init__()
        self.queries = nn.Embedding(queries, dim)
        layer = nn.TransformerDecoderLayer(
            dim, heads, dim * 4, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.category = nn.Sequential(nn.Linear(hidden, dim), nn.GELU(), nn.Linear(dim, dim))
        self.class_embed = nn.Linear(dim, dim)
        self.no_object = nn.Parameter(torch.zeros(1))
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.pixel = nn.Conv2d(dim, dim, 1)

    def forward(
        self, feats: Tensor, pe: Tensor, time: Tensor, fine: Tensor, categories: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """feats (G,T,C,h,w) SAM2 embeddings of G clips, pe (1,C,h,w), time (T,C) the frames' encoding,
        fine (G,T,C,H,W) the stride-4 FPN level, one (C_r,hidden) category tensor per clip -> per clip
        (N,C_r+1) class logits and (N,T,H,W) mask logits."""
        g, t = feats.shape[:2]
        memory = (feats + pe + time[..., None, None]).permute(0, 1, 3, 4, 2).flatten(1, 3)
        q = self.decoder(self.queries.weight.expand(g, -1, -1), memory)  # (G,N,C)
        pixels = self.pixel(fine.flatten(0, 1)).unflatten(0, (g, t))
        masks = torch.einsum("gnc,gtchw->gnthw", self.mask_embed(q), pixels)
        scored = self.class_embed(q)
        out = []
        for r, cats in enumerate(categories):
            logits = scored[r] @ self.category(cats).T / q.shape[-1] ** 0.5  # (N,C_r)
            out.append((torch.cat([logits, self.no_object.expand(len(logits), 1)], 1), masks[r]))
        return out


def detections(
    class_logits: Tensor, mask_logits: Tensor, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: its category (argmax over the real classes), score (that probability), bool mask."""
    prob = class_logits.float().softmax(-1)[:, :-1]
    score, cat = prob.max(-1)
    masks = F.interpolate(mask_logits[None].float(), size=(size, size), mode="bilinear")[0] > 0
    return cat.cpu().numpy(), score.cpu().numpy(), masks.cpu().numpy()


def category_map(
    preds: list[tuple[list[str], tuple]], gts: list[list[tuple[str, np.ndarray]]]
) -> dict[str, float]:
    """COCO mask mAP: mask AP per category (metrics.mask_ap), averaged over the categories present.
    preds: per image (category names, detections()); gts: per image (category, mask) instances."""
    names = sorted({c for g in gts for c, _ in g})
    per = []
    for name in names:
        p = []
        for cats, (cat, score, masks) in preds:
            keep = [i for i, c in enumerate(cat) if cats[c] == name]
            p.append(([masks[i] for i in keep], [float(score[i]) for i in keep]))
        per.append(mask_ap(p, [[m for c, m in g if c == name] for g in gts]))
    return {
        "AP": float(np.mean([a["AP"] for a in per])),
        "AP50": float(np.mean([a["AP50"] for a in per])),
        "categories": len(names),
    }
