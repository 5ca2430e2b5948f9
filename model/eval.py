"""`groundmill eval CONFIG CHECKPOINT [key=value ...]`: metrics of a checkpoint on the config's val sources.

Referring (cIoU, gIoU), interactive (cIoU), VGD (mask AP), video referring / object (J, F, J&F), GCG
(AP50, mIoU, mask recall with MiniLM phrase similarity; METEOR/CIDEr when pycocoevalcap is present).
Alongside, the baseline that segments every object in the scene regardless of the words. Prompt draws
are seeded by the sample key, so a checkpoint always gets the same score (X-SAM issue #37).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from groundmill.model.config import TrainConfig, load_config
from groundmill.model.data import collate
from groundmill.model.generic import category_map, detections
from groundmill.model.metrics import (
    caption_scores,
    ciou_giou,
    gcg_miou,
    j_and_f,
    mask_ap,
    mask_recall,
    minilm_embedder,
)
from groundmill.model.mllm import load_processor
from groundmill.model.modeling import P_CLOSE, P_OPEN, SEG, X2SamModel
from groundmill.model.records import eval_records, mask_at
from groundmill.model.tasks import (
    ANSWER,
    QUESTIONS,
    gcg_phrases,
    generic_sample,
    prompt_sample,
    referring_targets,
    video_rows,
    video_targets,
)
from groundmill.model.train import build_model, load_checkpoint, setup_device


def load_for_eval(cfg: TrainConfig, ckpt: str | Path) -> tuple[X2SamModel, ProcessorMixin]:
    tok = load_processor(ckpt)
    model = build_model(cfg, tok)
    load_checkpoint(Path(ckpt), model)
    return model.eval(), tok


@torch.no_grad()
def predict(model: X2SamModel, samples: list[dict], tok: ProcessorMixin, cfg: TrainConfig,
            device: torch.device) -> list[np.ndarray]:  # fmt: skip
    """Teacher-forced masks for task samples: one bool (Q,T,S,S) array per sample."""
    out: list[np.ndarray | None] = [None] * len(samples)
    by_frames: dict[int, list[int]] = defaultdict(list)  # a batch needs one frame count
    for i, s in enumerate(samples):
        by_frames[len(s["frames"])].append(i)
    for frames, idx in by_frames.items():
        bs = cfg.data.video_batch_size if frames > 1 else cfg.data.batch_size
        for start in range(0, len(idx), bs):
            chunk = idx[start : start + bs]
            batch = {
                k: v.to(device)
                for k, v in collate(
                    [samples[i] for i in chunk], tok, cfg.data.dense_frames, cfg.data.sparse_frames
                ).items()
            }
            masks = (model(batch)["mask_logits"] > 0).cpu().numpy()
            counts = (batch["input_ids"] == model.seg_id).sum(1).tolist()
            for i, m in zip(chunk, np.split(masks, np.cumsum(counts)[:-1]), strict=True):
                out[i] = m
    return out


def parse_gcg(tok: PreTrainedTokenizerBase, ids: list[int]) -> tuple[str, list[str]]:
    """Generated answer ids -> (plain caption, phrase before each [SEG])."""
    words, phrases, current, inside = [], [], [], False
    for t in tok.convert_ids_to_tokens(ids):
        if t == P_OPEN:
            inside, current = True, []
        elif t == P_CLOSE:
            inside = False
        elif t == SEG:
            phrases.append(" ".join(current))
        elif t not in tok.all_special_tokens:
            words.append(t)
            if inside:
                current.append(t)
    return " ".join(words), phrases


@torch.no_grad()
def gcg_predict(model: X2SamModel, sample: dict, tok: ProcessorMixin, device: torch.device,
                max_new_tokens: int) -> tuple[str, list[str], list[np.ndarray]]:  # fmt: skip
    """Greedy caption with its [SEG]s, then the masks of those [SEG]s."""
    batch = {k: v.to(device) for k, v in collate([{**sample, "answer": ""}], tok).items()}
    prompt = batch["input_ids"]
    ids = model.generate(batch, max_new_tokens, tok.tokenizer.eos_token_id)
    caption, phrases = parse_gcg(tok.tokenizer, ids[0, prompt.shape[1] :].tolist())
    if not phrases:
        return caption, [], []
    full = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    masks = (model(full)["mask_logits"][:, 0] > 0).cpu().numpy()
    return caption, phrases, list(masks)


def eval_samples(cfg: TrainConfig) -> Iterator[tuple[str, dict, dict]]:
    """(task, sample, record) for the val sources, deterministic per sample key; at most
    cfg.eval_samples records of each modality."""
    size, seen = cfg.vision.image_size, defaultdict(int)
    for record, frames in eval_records(cfg.data.val, size):
        kind = record["media"]["type"]
        if seen[kind] >= cfg.eval_samples:
            continue
        seen[kind] += 1
        rng = random.Random(record["key"])
        if kind == "video":
            for task in ("video_referring", "video_object"):
                for target in video_targets(record, task, rng):
                    for row in video_rows(frames, [target], rng, size, task, len(target[1]["masklet"])):
                        yield task, row, record
            continue
        for expr, mask in referring_targets(record, size):
            question = QUESTIONS["referring"].format(expr)
            yield "referring", {"question": question, "answer": ANSWER, "masks": [[mask]],
                                "frames": frames[:1]}, record  # fmt: skip
        for task in ("interactive", "vgd"):
            sample = prompt_sample(record, rng, size, task)
            if sample:
                yield task, {**sample, "frames": frames[:1]}, record
        generic = generic_sample(record, rng, size) if cfg.decoder.queries else None
        if generic:
            yield "generic", {**generic, "frames": frames[:1]}, record
        if gcg_phrases(record, size):
            yield (
                "gcg",
                {"question": QUESTIONS["gcg"], "answer": "", "masks": [], "frames": frames[:1]},
                record,
            )


def everything_baseline(record: dict, sample: dict, size: int) -> list[np.ndarray]:
    """The union of every object (image) or every track (per frame, video) in the scene."""
    if "frame_index" in sample:
        tracks = record.get("tracks", [])
        return [
            np.logical_or.reduce(
                [mask_at(t["masklet"][str(i)], size) for t in tracks if str(i) in t["masklet"]]
            )
            for i in sample["frame_index"]
        ]
    masks = [mask_at(o["segmentation"], size) for o in record.get("objects", []) if o.get("segmentation")]
    return [np.logical_or.reduce(masks)]


def evaluate(cfg: TrainConfig, ckpt: str | Path, gcg_limit: int = 50) -> dict[str, dict[str, float]]:
    _, _, device = setup_device(cfg)
    model, tok = load_for_eval(cfg, ckpt)
    model.to(device)
    size = cfg.vision.image_size
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for task, sample, record in eval_samples(cfg):
        groups[task].append((sample, record))
    results: dict[str, dict[str, float]] = {}
    for task in ("referring", "interactive", "video_referring", "video_object"):
        if not groups[task]:
            continue
        samples = [s for s, _ in groups[task]]
        preds = [p[0] for p in predict(model, samples, tok, cfg, device)]  # (T,S,S) per sample
        gts = [s["masks"][0] for s in samples]
        base = [everything_baseline(r, s, size) for s, r in groups[task]]
        if task.startswith("video"):
            results[task] = {**j_and_f(preds, gts), "n": len(samples)}
            results[f"{task}_baseline"] = j_and_f(base, gts)
        else:
            ciou, giou = ciou_giou([p[0] for p in preds], [g[0] for g in gts])
            results[task] = {"cIoU": ciou, "gIoU": giou, "n": len(samples)}
            b_ciou, b_giou = ciou_giou([b[0] for b in base], [g[0] for g in gts])
            results[f"{task}_baseline"] = {"cIoU": b_ciou, "gIoU": b_giou}
    if groups["vgd"]:
        samples = [s for s, _ in groups["vgd"]]
        preds = predict(model, samples, tok, cfg, device)
        results["vgd"] = mask_ap(
            [([p[0, 0]], [1.0]) for p in preds], [_instances(r, s, size) for s, r in groups["vgd"]]
        )
    if groups["generic"]:
        results["generic"] = evaluate_generic(model, [s for s, _ in groups["generic"]], tok, device, size)
    if groups["gcg"]:
        results["gcg"] = evaluate_gcg(
            model, groups["gcg"][:gcg_limit], tok, device, size, cfg.data.max_text_tokens
        )
    return results


def _instances(record: dict, sample: dict, size: int) -> list[np.ndarray]:
    """VGD ground truth: the instances inside the sample's target (all objects sharing the label)."""
    target = sample["masks"][0][0]
    masks = [mask_at(o["segmentation"], size) for o in record.get("objects", []) if o.get("segmentation")]
    return [m for m in masks if m.any() and (m & target).sum() == m.sum()]


@torch.no_grad()
def evaluate_generic(model: X2SamModel, samples: list[dict], tok: ProcessorMixin, device: torch.device,
                     size: int) -> dict[str, float]:  # fmt: skip
    """The generic head's COCO mask mAP over the samples' categories (teacher-forced category [SEG]s)."""
    preds, gts = [], []
    for s in samples:
        batch = {k: v.to(device) for k, v in collate([s], tok).items()}
        class_logits, mask_logits = model(batch)["generic"][0]
        preds.append((s["categories"], detections(class_logits, mask_logits, size)))
        gts.append([(s["categories"][c], m) for c, m in s["instances"]])
    return {**category_map(preds, gts), "n": len(samples)}


def evaluate_gcg(model: X2SamModel, items: list[tuple[dict, dict]], tok: ProcessorMixin,
                 device: torch.device, size: int, max_new_tokens: int) -> dict[str, float]:  # fmt: skip
    preds, gts, captions, refs = [], [], {}, {}
    for sample, record in items:
        caption, phrases, masks = gcg_predict(model, sample, tok, device, max_new_tokens)
        gt_caption, spans, gt_masks = gcg_phrases(record, size)
        preds.append((masks, phrases))
        gts.append((gt_masks, [gt_caption[s:e] for s, e in spans]))
        captions[record["key"]], refs[record["key"]] = caption, [gt_caption]
    ap = mask_ap([(m, [1.0] * len(m)) for m, _ in preds], [g for g, _ in gts])
    return {
        "AP50": ap["AP50"],
        "mIoU": gcg_miou([m for m, _ in preds], [g for g, _ in gts]),
        "recall": mask_recall(preds, gts, minilm_embedder()),
        **caption_scores(captions, refs),
        "n": len(items),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="groundmill eval", description="Evaluate a checkpoint on val shards.")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    a = p.parse_intermixed_args(argv)
    results = evaluate(load_config(a.config, a.overrides), a.checkpoint)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
