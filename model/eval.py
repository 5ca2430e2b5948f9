"""`groundmill eval CONFIG CHECKPOINT [--bench LAYOUT=PATH ...] [key=value ...]`: metrics of a checkpoint.

Without --bench: the config's val shards (groundmill's own layout) at the model's resolution: referring
and interactive (LISA cIoU / gIoU), VGD (COCO mask AP of per-instance predictions with scores), video
referring / object (DAVIS J, F, J&F over all frames), GCG (GLaMM AP50, mIoU, recall; METEOR, CIDEr,
BLEU-4, ROUGE-L via pycocoevalcap), each beside the baseline that segments every object in the scene
regardless of the words. Prompt draws are seeded by the sample key, so a checkpoint always gets the same
score (X-SAM issue #37). With --bench: the field's benchmark layouts (model/evalsets), scored by the
reference protocols at the ground truth's resolution. Either way a JSON report and the papers' tables.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import ProcessorMixin

from groundmill.model.config import SourceConfig, TrainConfig, load_config
from groundmill.model.data import collate
from groundmill.model.eval_bench import Segmenter, evaluate_layout
from groundmill.model.eval_report import format_tables, write_report
from groundmill.model.evalsets import LAYOUTS
from groundmill.model.generic import category_map, detections
from groundmill.model.metrics import caption_scores, ciou_giou, gcg_miou, gcg_recall, j_and_f, mask_ap
from groundmill.model.modeling import X2SamModel
from groundmill.model.phrases import GLAMM_EMBEDDER, Embedder, load_embedder
from groundmill.model.predict import gcg_predict, load_for_eval, predict
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
from groundmill.model.train import setup_device
from groundmill.schema import masklet_by_frame


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
            np.logical_or.reduce([mask_at(m[i], size) for m in map(masklet_by_frame, tracks) if i in m])
            for i in sample["frame_index"]
        ]
    masks = [mask_at(o["segmentation"], size) for o in record.get("objects", []) if o.get("segmentation")]
    return [np.logical_or.reduce(masks)]


def evaluate(cfg: TrainConfig, ckpt: str | Path, gcg_limit: int = 50,
             embedder: tuple[Embedder, str] | None = None) -> dict[str, dict]:  # fmt: skip
    """Metrics per task on the config's val shards (see the module docstring); `gcg` names its embedder."""
    _, _, device = setup_device(cfg)
    model, tok = load_for_eval(cfg, ckpt)
    model.to(device)
    size = cfg.vision.image_size
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for task, sample, record in eval_samples(cfg):
        groups[task].append((sample, record))
    results: dict[str, dict] = {}
    for task in ("referring", "interactive", "video_referring", "video_object"):
        if not groups[task]:
            continue
        samples = [s for s, _ in groups[task]]
        preds = [p[0] > 0 for p in predict(model, samples, tok, cfg, device)]  # (T,S,S) per sample
        gts = [s["masks"][0] for s in samples]
        base = [everything_baseline(r, s, size) for s, r in groups[task]]
        score = (
            j_and_f
            if task.startswith("video")
            else lambda p, g: ciou_giou([x[0] for x in p], [x[0] for x in g])
        )
        results[task] = {**score(preds, gts), "n": len(samples)}
        results[f"{task}_baseline"] = {**score(base, gts), "n": len(samples)}
    if groups["vgd"]:
        samples = [s for s, _ in groups["vgd"]]
        preds = [instances_from_logits(p[0, 0]) for p in predict(model, samples, tok, cfg, device)]
        gts = [_instances(r, s, size) for s, r in groups["vgd"]]
        results["vgd"] = {**mask_ap(preds, gts), "n": len(samples)}
    if groups["generic"]:
        results["generic"] = evaluate_generic(model, [s for s, _ in groups["generic"]], tok, device, size)
    if groups["gcg"]:
        embed, name = embedder or load_embedder()
        results["gcg"] = evaluate_gcg(
            model, groups["gcg"][:gcg_limit], tok, device, size, cfg.data.max_text_tokens, embed
        )
        results["gcg"]["phrase_embedder"] = name
    return results


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, in order of their first pixel (row-major)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:  # every pixel takes the largest label among itself and its neighbours inside the mask
        p = np.pad(labels, 1)
        grown = np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    ids = [i for i in dict.fromkeys(labels[mask].tolist())]
    return [labels == i for i in ids]


def instances_from_logits(logits: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """VGD instances from one [SEG]'s mask: its connected components, each scored by its mean sigmoid
    probability. The bundled model predicts one mask per [SEG]; X2SAM's VGD head predicts instances with
    class scores, which this approximates so COCO AP sees ranked instances, not one union mask."""
    masks = components(logits > 0)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return masks, [float(probs[m].mean()) for m in masks]


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
        batch = {k: v.to(device) for k, v in collate([s], tok, model.slots).items()}
        class_logits, mask_logits = model(batch)["generic"][0]
        preds.append((s["categories"], detections(class_logits, mask_logits, size)))
        gts.append([(s["categories"][c], m) for c, m in s["instances"]])
    return {**category_map(preds, gts), "n": len(samples)}


def evaluate_gcg(model: X2SamModel, items: list[tuple[dict, dict]], tok: ProcessorMixin,
                 device: torch.device, size: int, max_new_tokens: int, embed: Embedder) -> dict:  # fmt: skip
    preds, gts, captions, refs = [], [], {}, {}
    for sample, record in items:
        caption, phrases, logits = gcg_predict(model, sample, tok, device, max_new_tokens)
        gt_caption, spans, gt_masks = gcg_phrases(record, size)
        preds.append((list(logits > 0), phrases))
        gts.append((gt_masks, [gt_caption[s:e] for s, e in spans]))
        captions[record["key"]], refs[record["key"]] = caption, [gt_caption]
    ap = mask_ap([(m, [1.0] * len(m)) for m, _ in preds], [g for g, _ in gts])
    out = {"AP50": ap["AP50"], "mIoU": gcg_miou([m for m, _ in preds], [g for g, _ in gts]),
           "recall": gcg_recall(preds, gts, embed), "n": len(items)}  # fmt: skip
    try:
        out |= caption_scores(captions, refs)
    except RuntimeError as e:  # no Java
        out["captions_unavailable"] = str(e)
    return out


SHARDS_PROTOCOL = (
    "groundmill shards (data.val): at the model resolution (cfg.vision.image_size); referring / interactive "
    "LISA cIoU and gIoU, video DAVIS J and F over every sampled frame, VGD COCO mask AP of connected "
    "components scored by mean probability, GCG as GLaMM; *_baseline segments every object"
)


def run_eval(cfg: TrainConfig, ckpt: str | Path, benches: list[tuple[str, str]], splits: list[str] | None = None,
             images: str | None = None, limit: int | None = None, phrase_model: str = GLAMM_EMBEDDER) -> dict:  # fmt: skip
    """The report: one entry per dataset (`shards` or a benchmark layout)."""
    embedder, segmenter = None, None
    report: dict = {"checkpoint": str(ckpt), "datasets": {}}
    for layout, path in benches:
        if layout == "shards":
            cfg.data.val = [SourceConfig(path=path)] if path else cfg.data.val
            if embedder is None:
                embedder = load_embedder(phrase_model)
            results = evaluate(cfg, ckpt, embedder=embedder)
            entry = {"layout": "shards", "path": ", ".join(s.path for s in cfg.data.val), "task": "mixed",
                     "protocol": SHARDS_PROTOCOL, "splits": results}  # fmt: skip
        else:
            if LAYOUTS[layout].task == "gcg" and embedder is None:
                embedder = load_embedder(phrase_model)
            segmenter = segmenter or _segmenter(cfg, ckpt)  # one model load for every benchmark
            entry = evaluate_layout(segmenter, layout, path, splits, images, limit, embedder)
        report["datasets"][_unique(report["datasets"], layout)] = entry
    return report


def _segmenter(cfg: TrainConfig, ckpt: str | Path) -> Segmenter:
    _, _, device = setup_device(cfg)
    model, tok = load_for_eval(cfg, ckpt)
    return Segmenter(model.to(device), tok, cfg, device)


def _unique(existing: dict, name: str) -> str:
    return name if name not in existing else f"{name}-{sum(k.startswith(name) for k in existing) + 1}"


def parse_bench(value: str) -> tuple[str, str]:
    layout, _, path = value.partition("=")
    if layout not in LAYOUTS and layout != "shards":
        raise argparse.ArgumentTypeError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)} and shards")
    if layout != "shards" and not path:
        raise argparse.ArgumentTypeError(f"--bench {layout} needs a path: --bench {layout}=DIR")
    return layout, path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="groundmill eval", description="Evaluate a checkpoint: val shards or benchmark layouts."
    )
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument(
        "--bench",
        action="append",
        type=parse_bench,
        metavar="LAYOUT=PATH",
        help=f"a benchmark dataset (repeatable); layouts: {', '.join(sorted(LAYOUTS))}, shards[=DIR]",
    )
    p.add_argument("--split", action="append", help="splits to evaluate (default: the layout's eval splits)")
    p.add_argument("--images", help="image folder for refcoco* (COCO train2014) or grandf")
    p.add_argument("--limit", type=int, help="at most this many items per dataset")
    p.add_argument(
        "--phrase-embedder",
        default=GLAMM_EMBEDDER,
        help="GCG recall's phrase model (hub id, path, or minilm)",
    )
    p.add_argument("--report", help="report JSON (default: OUT_DIR/eval_report.json)")
    a = p.parse_intermixed_args(argv)
    cfg = load_config(a.config, a.overrides)
    report = run_eval(
        cfg, a.checkpoint, a.bench or [("shards", "")], a.split, a.images, a.limit, a.phrase_embedder
    )
    path = write_report(report, a.report or Path(cfg.out_dir) / "eval_report.json")
    print(format_tables(report))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
