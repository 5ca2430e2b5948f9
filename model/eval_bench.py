"""A checkpoint on the field's benchmark layouts (model/evalsets): predictions at the model's square
resolution, their mask logits resized (bilinear) to each ground truth's size, then the reference metrics.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ProcessorMixin

from groundmill.model.config import TrainConfig
from groundmill.model.evalsets import LAYOUTS, GCGItem, ReferItem, VideoItem, load_rgb, read_layout
from groundmill.model.evalsets.referring import ann_mask
from groundmill.model.metrics import (
    caption_scores,
    ciou_giou_from_counts,
    coco_mask_ap,
    cosine_matrix,
    glamm_iou_matrix,
    intersection_union,
    paired_mean_iou,
    recall_matches,
    sequence_scores,
    summarize_jf,
)
from groundmill.model.modeling import PROMPT_TYPES, REGION, X2SamModel
from groundmill.model.phrases import Embedder
from groundmill.model.predict import gcg_predict, predict
from groundmill.model.tasks import ANSWER, QUESTIONS
from groundmill.schema import encode_mask


def resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., S, S) mask logits -> (..., H, W) logits, bilinear (threshold at 0 afterwards)."""
    t = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
    lead = t.shape[:-2]
    up = F.interpolate(t.reshape(1, -1, *t.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *size).numpy()


class Segmenter:
    """The model on benchmark images and clips, frames resized to cfg.vision.image_size."""

    def __init__(self, model: X2SamModel, tok: ProcessorMixin, cfg: TrainConfig, device: torch.device):
        self.model, self.tok, self.cfg, self.device = model, tok, cfg, device
        self.size = cfg.vision.image_size

    def frame(self, path: Path) -> np.ndarray:
        return np.asarray(Image.fromarray(load_rgb(path)).resize((self.size, self.size)))

    def _predict(self, samples: list[dict]) -> list[np.ndarray]:
        return predict(self.model, samples, self.tok, self.cfg, self.device)

    def refer(self, image: Path, texts: list[str]) -> list[np.ndarray]:
        """(S, S) mask logits per expression; the expressions share one encoded image."""
        frames = [self.frame(image)]
        empty = [np.zeros((1, self.size, self.size), bool)]
        samples = [{"question": QUESTIONS["referring"].format(t), "answer": ANSWER, "masks": empty, "frames": frames}
                   for t in texts]  # fmt: skip
        return [p[0, 0] for p in self._predict(samples)]

    def track(self, item: VideoItem) -> list[np.ndarray]:
        """(T, S, S) mask logits per target: video referring by text, video object by first-frame mask."""
        clip = [self.frame(p) for p in item.frames]
        empty = [np.zeros((len(clip), self.size, self.size), bool)]
        samples = []
        for target in item.targets:
            if target.text is not None:
                q = QUESTIONS["video_referring"].format(target.text)
                samples.append({"question": q, "answer": ANSWER, "masks": empty, "frames": clip})
                continue
            prompt = np.asarray(Image.fromarray(target.prompt).resize((self.size, self.size), Image.NEAREST))
            region = (prompt.astype(np.float32), PROMPT_TYPES.index("mask"), 0)
            samples.append({"question": QUESTIONS["video_object"].format(REGION), "answer": ANSWER,
                            "masks": empty, "frames": clip, "region": region})  # fmt: skip
        return [p[0] for p in self._predict(samples)]

    def caption(self, image: Path) -> tuple[str, list[str], np.ndarray]:
        sample = {"question": QUESTIONS["gcg"], "answer": "", "masks": [], "frames": [self.frame(image)]}
        return gcg_predict(self.model, sample, self.tok, self.device, self.cfg.data.max_text_tokens)


def score_referring(seg: Segmenter, items: Iterable[ReferItem]) -> dict[str, dict]:
    counts: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for image, group in itertools.groupby(items, key=lambda it: it.image):
        group = list(group)
        for item, logits in zip(group, seg.refer(image, [it.text for it in group]), strict=True):
            pred = resize_logits(logits, item.mask.shape) > 0
            for g in item.groups:
                counts[g].append(intersection_union(pred, item.mask, item.ignore))
    return {g: {**ciou_giou_from_counts(c), "n": len(c)} for g, c in counts.items()}


def exclusive_masks(up: np.ndarray) -> np.ndarray:
    """(N, H, W) bool-or-logit maps of N objects -> one label map's per-object masks: each pixel to the
    object of highest logit among those > 0 (DAVIS results are one palette PNG per frame)."""
    best = up.argmax(0)
    return (up.max(0) > 0)[None] & (best[None] == np.arange(len(up))[:, None, None])


def score_video(seg: Segmenter, items: Iterable[VideoItem]) -> dict[str, dict]:
    sequences: dict[str, list] = defaultdict(list)
    for item in items:
        logits = np.stack(seg.track(item))  # (N, T, S, S)
        h, w = item.targets[0].masks[0].shape
        preds: list[list[np.ndarray]] = [[] for _ in item.targets]
        for t in item.scored:
            up = resize_logits(logits[:, t], (h, w))
            masks = exclusive_masks(up) if item.exclusive else up > 0
            for k in range(len(item.targets)):
                preds[k].append(masks[k])
        for k, target in enumerate(item.targets):
            scores = sequence_scores(preds[k], [target.masks[t] for t in item.scored])
            for g in item.groups:
                sequences[g].append(scores)
    return {g: {**summarize_jf(s), "n": len(s)} for g, s in sequences.items()}


def score_gcg(seg: Segmenter, items: Iterable[GCGItem], embed: Embedder) -> dict[str, dict]:
    """GLaMM's evaluate.py per split: AP50 (all scores 1.0), mIoU, recall, and the caption metrics."""
    per_split: dict[str, list] = defaultdict(list)
    for item in items:
        caption, phrases, logits = seg.caption(item.image)
        pred = list(resize_logits(logits, (item.height, item.width)) > 0) if len(phrases) else []
        gt = [ann_mask(a["segmentation"], item.height, item.width) for a in item.annotations]
        ious = glamm_iou_matrix(pred, gt)
        sims = cosine_matrix(embed(item.labels), embed(phrases)) if pred and item.labels else np.zeros((0, 0))
        matched = recall_matches(ious.T, sims) if pred and gt else 0
        for g in item.groups:
            per_split[g].append((item, caption, pred, paired_mean_iou(ious), matched))
    return {g: _gcg_summary(rows) for g, rows in per_split.items()}


def _gcg_summary(rows: list) -> dict:
    images = [{"id": it.image_id, "height": it.height, "width": it.width} for it, *_ in rows]
    anns = [a for it, *_ in rows for a in it.annotations]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    dets = [
        {"image_id": it.image_id, "segmentation": encode_mask(m), "score": 1.0}
        for it, _, pred, *_ in rows
        for m in pred
    ]
    positives = sum(len(it.labels) for it, *_ in rows)
    out = {
        "AP50": coco_mask_ap(gt, dets)["AP50"],
        "mIoU": float(np.mean([r[3] for r in rows])),
        "recall": sum(r[4] for r in rows) / positives if positives else 0.0,
        "n": len(rows),
    }
    try:
        out |= caption_scores(
            {it.image_id: c for it, c, *_ in rows}, {it.image_id: it.captions for it, *_ in rows}
        )
    except RuntimeError as e:  # no Java: say so in the report instead of a number
        out["captions_unavailable"] = str(e)
    return out


def evaluate_layout(seg: Segmenter, layout: str, path: str | Path, splits: list[str] | None = None,
                    images: str | Path | None = None, limit: int | None = None,
                    embedder: tuple[Embedder, str] | None = None) -> dict:  # fmt: skip
    """One benchmark dataset's report entry: layout, protocol, and metrics + counts per split."""
    spec = LAYOUTS[layout]
    items: Iterator = read_layout(layout, path, splits, images)
    if limit:
        items = itertools.islice(items, limit)
    entry = {"layout": layout, "path": str(path), "task": spec.task, "protocol": spec.protocol}
    if spec.task == "referring":
        entry["splits"] = score_referring(seg, items)
    elif spec.task == "video":
        entry["splits"] = score_video(seg, items)
    else:
        embed, name = embedder
        entry["phrase_embedder"] = name
        entry["splits"] = score_gcg(seg, items, embed)
    return entry
