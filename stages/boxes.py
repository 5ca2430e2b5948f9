"""Pure box logic of the detection stages: decoding, thresholds, NMS, GranD's cross-model voting,
and the mask-versus-box checks of the mask stage. No models here; every function is unit-tested on
hand-built inputs.

A detection is a plain dict `{"bbox": [x0, y0, x1, y1], "label": str, "score": float}` in pixels of
the stored image (what `record["detections"][stage]` holds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from groundmill.schema import Object

Detection = dict[str, Any]
Box = tuple[float, ...]  # a detection box as a dict key


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) of xyxy boxes a (N, 4) and b (M, 4)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def decode_boxes(
    boxes_cxcywh: np.ndarray,
    query_scores: np.ndarray,
    queries: list[str],
    scale_wh: tuple[float, float],
    image_wh: tuple[int, int],
    min_side: float = 2.0,
) -> list[Detection]:
    """Detector outputs -> detections in image pixels.

    boxes_cxcywh: (N, 4) normalised centre boxes; query_scores: (N, Q) per-query probabilities;
    scale_wh: the pixel size the normalised boxes refer to (OWLv2: the padded square, Grounding DINO:
    the image). Each box takes its best query as label; boxes are clipped to the image and boxes
    thinner than `min_side` pixels after clipping are dropped.
    """
    if len(boxes_cxcywh) == 0 or not queries:
        return []
    sw, sh = scale_wh
    cx, cy, w, h = (np.asarray(boxes_cxcywh, dtype=np.float64) * [sw, sh, sw, sh]).T
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    xyxy = xyxy.clip(0, [image_wh[0], image_wh[1], image_wh[0], image_wh[1]])
    best = np.asarray(query_scores).argmax(axis=1)
    dets = []
    for box, q, scores in zip(xyxy, best, query_scores, strict=True):
        if box[2] - box[0] >= min_side and box[3] - box[1] >= min_side:
            dets.append(
                {"bbox": [round(float(v), 2) for v in box], "label": queries[q], "score": float(scores[q])}
            )
    return dets


def threshold(dets: list[Detection], min_score: float) -> list[Detection]:
    return [d for d in dets if d["score"] >= min_score]


def nms(dets: list[Detection], iou_threshold: float) -> list[Detection]:
    """Class-agnostic greedy NMS: keep the best-scoring box, drop others with IoU > iou_threshold."""
    order = sorted(range(len(dets)), key=lambda i: -dets[i]["score"])
    if not order:
        return []
    iou = box_iou([d["bbox"] for d in dets], [d["bbox"] for d in dets])
    kept: list[int] = []
    for i in order:
        if all(iou[i, k] <= iou_threshold for k in kept):
            kept.append(i)
    return [dets[i] for i in kept]


def filter_detections(
    dets: list[Detection], min_score: float, nms_iou: float, max_boxes: int
) -> list[Detection]:
    """One model's detections as GranD keeps them: score threshold, then NMS, then the best `max_boxes`."""
    return nms(threshold(dets, min_score), nms_iou)[:max_boxes]


def vote(
    per_model: dict[str, list[Detection]],
    min_iou: float = 0.65,
    min_dice: float = 0.75,
    masks: dict[str, list[np.ndarray | None]] | None = None,
    min_agreeing: int = 1,
) -> tuple[list[Object], list[Object]]:
    """GranD's cross-model agreement: (objects, floating_objects). `per_model` is keyed by detection
    stage, so two checkpoints of one family are two voters.

    Detections are visited best score first. Each other stage may lend its best unclaimed detection
    with box IoU >= min_iou (and mask Dice >= min_dice when both carry masks). With at least
    `min_agreeing` such stages (GranD: one second model) the detection becomes an object: it keeps
    the leading box and score, and takes the labels of all agreeing detections (best first) and the
    names of their stages. Otherwise it becomes a floating object and the detections it had found are
    free again. Ids are unique over both lists (objects first).
    """
    pool = [(m, i, d) for m, dets in per_model.items() for i, d in enumerate(dets)]
    pool.sort(key=lambda t: -t[2]["score"])
    claimed: set[tuple[str, int]] = set()
    objects: list[Object] = []
    floating: list[Object] = []
    for model, i, det in pool:
        if (model, i) in claimed:
            continue
        claimed.add((model, i))
        group = [(model, i, det)]
        for other, dets in per_model.items():
            if other == model or not dets:
                continue
            ious = box_iou([det["bbox"]], [d["bbox"] for d in dets])[0]
            for j in np.argsort(-ious, kind="stable"):
                if ious[j] < min_iou:
                    break
                if (other, int(j)) in claimed or not _masks_agree(
                    masks, (model, i), (other, int(j)), min_dice
                ):
                    continue
                claimed.add((other, int(j)))
                group.append((other, int(j), dets[j]))
                break
        if len(group) - 1 >= min_agreeing:
            objects.append(_object(group))
        else:
            claimed.difference_update((m, j) for m, j, _ in group[1:])
            floating.append(_object(group[:1]))
    for n, obj in enumerate(objects + floating):
        obj["id"] = n
    return objects, floating


def _masks_agree(
    masks: dict[str, list[np.ndarray | None]] | None, a: tuple[str, int], b: tuple[str, int], min_dice: float
) -> bool:
    if not masks:
        return True
    ma, mb = masks.get(a[0], [None] * (a[1] + 1))[a[1]], masks.get(b[0], [None] * (b[1] + 1))[b[1]]
    return ma is None or mb is None or mask_dice(ma, mb) >= min_dice


def _object(group: list[tuple[str, int, Detection]]) -> Object:
    lead = group[0][2]
    labels = list(dict.fromkeys(d["label"] for _, _, d in group))
    return Object(
        id=-1,
        bbox=list(lead["bbox"]),
        labels=labels,
        attributes=[],
        score=round(float(lead["score"]), 4),
        detectors=sorted({m for m, _, _ in group}),
    )


def box_agrees(mask_box: list[float], prompt_box: list[float], tolerance: float) -> bool:
    """Whether a mask's tight box matches its prompt box: every edge within `tolerance` x the box's
    side (plus one pixel of rounding). An empty mask never agrees."""
    if mask_box[2] <= mask_box[0] or mask_box[3] <= mask_box[1]:
        return False
    w, h = prompt_box[2] - prompt_box[0], prompt_box[3] - prompt_box[1]
    slack = np.array([w, h, w, h]) * tolerance + 1.0
    return bool(np.all(np.abs(np.asarray(mask_box) - np.asarray(prompt_box)) <= slack))


def clip_mask_to_box(mask: np.ndarray, box: list[float]) -> np.ndarray:
    """The mask with every pixel outside the box (rounded outwards) cleared."""
    h, w = mask.shape
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    clipped = np.zeros_like(mask, dtype=bool)
    clipped[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return clipped


def mask_within_box(mask_box: list[float], box: list[float]) -> bool:
    """Whether a mask's tight box lies inside `box` rounded outwards (the record invariant; an empty
    mask lies in any box)."""
    if mask_box[2] <= mask_box[0] or mask_box[3] <= mask_box[1]:
        return True
    return (
        mask_box[0] >= np.floor(box[0])
        and mask_box[1] >= np.floor(box[1])
        and mask_box[2] <= np.ceil(box[2])
        and mask_box[3] <= np.ceil(box[3])
    )
