"""The field's segmentation and caption metrics, each equal to the reference implementation it names.

Masks are bool HxW numpy arrays. References (read, not copied):
  DAVIS 2017   davisvideochallenge/davis2017-evaluation `davis2017/metrics.py`, `utils.db_statistics`
  LISA         dvlab-research/LISA `train_ds.py` validate() + `utils/utils.py` intersectionAndUnionGPU
  GLaMM GCG    mbzuai-oryx/groundingLMM `eval/gcg/evaluate.py` (+ `eval/utils.py` compute_iou)
  COCO         pycocotools COCOeval (segm); pycocoevalcap scorers after its PTBTokenizer
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from collections.abc import Callable, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from groundmill.schema import encode_mask

Masks = Sequence[np.ndarray]
Embedder = Callable[[list[str]], np.ndarray]

# ---------------------------------------------------------------------------------------------------------
# DAVIS: J (region), F (boundary) and their statistics.


def jaccard(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """DAVIS `db_eval_iou`: IoU outside the void pixels; 1.0 when the union is empty (both masks empty)."""
    keep = np.ones_like(gt, bool) if void is None else ~void.astype(bool)
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = int(((pred | gt) & keep).sum())
    return 1.0 if union == 0 else int((pred & gt & keep).sum()) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """DAVIS `_seg2bmap`: a pixel is boundary when it differs from its east, south or south-east neighbour,
    neighbours beyond the image counting as background; the last row compares east only, the last column
    south only, and the bottom-right pixel is never boundary. A full-frame mask has no boundary."""
    seg = mask.astype(bool)
    east, south, south_east = (np.zeros_like(seg) for _ in range(3))
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk: the (2r+1)^2 footprint of points with x^2 + y^2 <= r^2."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """cv2.dilate by the footprint, as DAVIS does (pixels beyond the image count as background)."""
    import cv2

    return cv2.dilate(mask.astype(np.uint8), footprint.astype(np.uint8)).astype(bool)


def f_measure(
    pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008
) -> float:
    """DAVIS `f_measure`: boundary precision/recall within ceil(bound_th * image diagonal) pixels (disk
    dilation), F = 2PR/(P+R). No boundary in either: P = R = 1; none predicted: P = 1, R = 0; none in the
    ground truth: P = 0, R = 1."""
    keep = np.ones_like(gt, bool) if void is None else ~void.astype(bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    pb, gb = boundary_map(pred.astype(bool) & keep), boundary_map(gt.astype(bool) & keep)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 or n_g == 0:
        precision, recall = (1.0 if n_p == 0 else 0.0), (1.0 if n_g == 0 else 0.0)
    else:
        fp = disk(int(radius))
        precision = int((pb & dilate(gb, fp)).sum()) / n_p
        recall = int((gb & dilate(pb, fp)).sum()) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(per_frame: Sequence[float]) -> tuple[float, float, float]:
    """DAVIS `db_statistics`: (mean, recall = fraction of frames > 0.5, decay = mean of the first quarter
    minus mean of the last, the quarters' bounds from round(linspace(1, n, 5)) - 1, each bin including its
    right bound). Deviation: the reference casts the bounds to uint8, which wraps for sequences of 256+
    frames; here they are plain ints."""
    v = np.asarray(per_frame, float)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
    return float(np.nanmean(v)), float(np.nanmean(v > 0.5)), float(np.nanmean(bins[0]) - np.nanmean(bins[3]))


def sequence_scores(preds: Masks, gts: Masks, voids: Masks | None = None) -> tuple[list[float], list[float]]:
    """Per-frame J and F of one object (or expression) over the frames given."""
    voids = voids if voids is not None else [None] * len(gts)
    j = [jaccard(p, g, v) for p, g, v in zip(preds, gts, voids, strict=True)]
    f = [f_measure(p, g, v) for p, g, v in zip(preds, gts, voids, strict=True)]
    return j, f


def summarize_jf(per_sequence: Sequence[tuple[Sequence[float], Sequence[float]]]) -> dict[str, float]:
    """DAVIS `evaluation_method.py` over sequences (DAVIS objects; MeViS / Ref-YouTube-VOS expressions):
    each sequence's mean, recall and decay of J and F, then the plain mean over sequences; J&F is the mean
    of J-Mean and F-Mean. (MeViS's `eval_mevis.py` reports the same J, F and J&F means.)"""
    if not per_sequence:
        return {}
    js = np.array([davis_statistics(j) for j, _ in per_sequence])
    fs = np.array([davis_statistics(f) for _, f in per_sequence])
    j, f = js.mean(0), fs.mean(0)
    return {"J&F": float((j[0] + f[0]) / 2), "J": float(j[0]), "J-Recall": float(j[1]), "J-Decay": float(j[2]),
            "F": float(f[0]), "F-Recall": float(f[1]), "F-Decay": float(f[2])}  # fmt: skip


def j_and_f(preds: Sequence[Masks], gts: Sequence[Masks]) -> dict[str, float]:
    """J, F, J&F (+ recall and decay) of sequences of masks, every frame scored (see summarize_jf)."""
    return summarize_jf([sequence_scores(p, g) for p, g in zip(preds, gts, strict=True)])


# ---------------------------------------------------------------------------------------------------------
# Referring segmentation (LISA): cIoU and gIoU.


def intersection_union(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """Foreground intersection and union, pixels marked ignore (LISA's label 255) excluded."""
    keep = np.ones_like(gt, bool) if ignore is None else ~ignore.astype(bool)
    pred, gt = pred.astype(bool) & keep, gt.astype(bool) & keep
    return int((pred & gt).sum()), int((pred | gt).sum())


def ciou_giou_from_counts(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """LISA: cIoU = sum I / (sum U + 1e-10), so 0 when every union is empty; gIoU = mean over samples of
    I / (U + 1e-5), a sample whose union is empty (empty prediction and target) counting 1."""
    if not counts:
        return {}
    i, u = np.array(counts, float).T
    per_sample = i / (u + 1e-5) + (u == 0)
    return {"cIoU": float(i.sum() / (u.sum() + 1e-10)), "gIoU": float(per_sample.mean())}


def ciou_giou(preds: Masks, gts: Masks, ignores: Masks | None = None) -> dict[str, float]:
    ignores = ignores if ignores is not None else [None] * len(gts)
    return ciou_giou_from_counts(
        [intersection_union(p, g, ig) for p, g, ig in zip(preds, gts, ignores, strict=True)]
    )


# ---------------------------------------------------------------------------------------------------------
# COCO mask AP (GCG AP50, VGD AP).


def coco_gt(masks_per_image: Sequence[Masks], sizes: Sequence[tuple[int, int]]) -> dict:
    """A one-category COCO instances dict from per-image ground-truth masks (image ids 0..n-1)."""
    images, annotations = [], []
    for image_id, (masks, (h, w)) in enumerate(zip(masks_per_image, sizes, strict=True)):
        images.append({"id": image_id, "height": h, "width": w})
        for m in masks:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": encode_mask(m), "area": float(m.sum()), "bbox": _xywh(m),
                                "iscrowd": 0})  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def coco_mask_ap(gt: dict, detections: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval (segm, category 1): AP at IoU .50:.95 and AP50 (GLaMM reports stats[1]).
    Detections are {image_id, segmentation (RLE), score}; equal scores keep their given order (COCOeval's
    stable sort). No ground truth: NaN. Deviation: no detections at all scores 0, where loadRes raises."""
    if not gt["annotations"]:
        return {"AP": float("nan"), "AP50": float("nan")}
    if not detections:
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([{**d, "category_id": 1} for d in detections]), "segm")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": max(0.0, float(ev.stats[0])), "AP50": max(0.0, float(ev.stats[1]))}


def mask_ap(preds: Sequence[tuple[Masks, Sequence[float]]], gts: Sequence[Masks]) -> dict[str, float]:
    """COCO mask AP of per-instance predictions (masks, scores) per image against per-instance ground
    truth (VGD: every instance of the prompted class; GCG: every phrase's mask with score 1.0)."""
    sizes = [
        (g[0] if len(g) else p[0]).shape if len(g) or len(p) else (1, 1)
        for (p, _), g in zip(preds, gts, strict=True)
    ]
    detections = [{"image_id": i, "segmentation": encode_mask(m), "score": float(s)}
                  for i, (pm, ps) in enumerate(preds) for m, s in zip(pm, ps, strict=True)]  # fmt: skip
    return coco_mask_ap(coco_gt(gts, sizes), detections)


def _xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# ---------------------------------------------------------------------------------------------------------
# GLaMM GCG: mIoU and mask recall.


def glamm_iou_matrix(rows: Masks, cols: Masks) -> np.ndarray:
    """GLaMM `compute_iou` for every pair: I / U, NaN when both masks are empty (0 / 0)."""
    out = np.zeros((len(rows), len(cols)))
    with np.errstate(invalid="ignore", divide="ignore"):
        for r, a in enumerate(rows):
            for c, b in enumerate(cols):
                out[r, c] = np.float64(np.logical_and(a, b).sum()) / np.logical_or(a, b).sum()
    return out


def paired_mean_iou(ious: np.ndarray) -> float:
    """GLaMM `compute_miou` on a (pred x gt) IoU matrix: take the highest IoU (first in row-major order on
    ties), drop its row and column, repeat while the best remaining IoU is > 0; the mean of those IoUs,
    0.0 when none. A NaN (empty vs empty) makes np.max NaN and ends the pairing, as in the reference."""
    paired = []
    while ious.size > 0 and np.max(ious) > 0:
        r, c = np.unravel_index(np.argmax(ious), ious.shape)
        paired.append(ious[r, c])
        ious = np.delete(np.delete(ious, r, axis=0), c, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def gcg_miou(preds: Sequence[Masks], gts: Sequence[Masks]) -> float:
    """GLaMM's GCG mIoU: paired_mean_iou per image, then the mean over images (0.0 for no images)."""
    per_image = [paired_mean_iou(glamm_iou_matrix(p, g)) for p, g in zip(preds, gts, strict=True)]
    return float(np.mean(per_image)) if per_image else 0.0


def recall_matches(ious: np.ndarray, sims: np.ndarray, iou_th: float = 0.5, text_th: float = 0.5) -> int:
    """GLaMM `find_best_matches` on (gt x pred) IoU and phrase-similarity matrices: repeatedly take the
    highest IoU (first in row-major order on ties); stop at the first such pair with IoU < iou_th or
    similarity < text_th; else count it and zero its row and column in both matrices. A NaN IoU (empty vs
    empty) is picked first by argmax and passes the IoU test (NaN < th is False), as in the reference."""
    ious, sims, matched = ious.copy(), sims.copy(), 0
    while ious.size > 0:
        r, c = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[r, c] < iou_th or sims[r, c] < text_th:
            break
        matched += 1
        ious[r, :], ious[:, c], sims[r, :], sims[:, c] = 0, 0, 0, 0
    return matched


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sklearn cosine_similarity: rows L2-normalised (zero rows stay zero), then dot products."""

    def unit(x: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n == 0, 1, n)

    return unit(np.asarray(a, float)) @ unit(np.asarray(b, float)).T


def gcg_recall(preds: Sequence[tuple[Masks, Sequence[str]]], gts: Sequence[tuple[Masks, Sequence[str]]],
               embed: Embedder, iou_th: float = 0.5, text_th: float = 0.5) -> float:  # fmt: skip
    """GLaMM's GCG mask recall: matches (recall_matches) summed over images / ground-truth phrases summed
    over images; 0 when there are no ground-truth phrases. Phrase similarity is the cosine of `embed`'s
    vectors (GLaMM: bert-base-uncased, mean of the last hidden states over all tokens)."""
    matched = total = 0
    for (pm, pp), (gm, gp) in zip(preds, gts, strict=True):
        total += len(gp)
        if not len(pm) or not len(gm):
            continue
        sims = cosine_matrix(embed(list(gp)), embed(list(pp)))
        matched += recall_matches(glamm_iou_matrix(gm, pm), sims, iou_th, text_th)
    return matched / total if total else 0.0


# ---------------------------------------------------------------------------------------------------------
# Captions (GCG): pycocoevalcap after its PTB tokenizer.


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """COCOEvalCap's scorers (pycocoevalcap) on PTBTokenizer output (Stanford PTB tokenizer: lower-cased,
    punctuation tokens removed): BLEU-4, METEOR 1.5, ROUGE-L, CIDEr (CIDEr-D document frequencies from
    the references given). Images are those predicted. Deviation: SPICE, which GLaMM's COCOEvalCap also
    runs but does not report, is skipped (it downloads Stanford models). The tokenizer and METEOR run
    Java: without it this raises."""
    if not java_available():
        raise RuntimeError(
            "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR): install a JRE"
        )
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(preds)
    with contextlib.redirect_stdout(io.StringIO()):  # the tokenizer and BLEU print progress
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
        res = tok.tokenize({i: [{"caption": preds[i]}] for i in ids})
        bleu = Bleu(4).compute_score(gts, res)[0][3]
        meteor = Meteor().compute_score(gts, res)[0]
        rouge = Rouge().compute_score(gts, res)[0]
        cider = Cider().compute_score(gts, res)[0]
    return {"BLEU-4": float(bleu), "METEOR": float(meteor), "ROUGE-L": float(rouge), "CIDEr": float(cider)}
