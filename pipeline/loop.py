"""`make loop`: the data engine and the trainer in one loop, measured on a closed world.

Synthetic coloured-shape scenes (model/synthetic.py) carry their ground truth. Per model seed:

- round 0 trains the tiny X2SAM (manifests/train_tiny.yaml) from scratch on a labelled seed set;
- the engine (`groundmill run`, one `x2sam` stage asking every colour-shape name of the world of each
  image, most of them absent: the model's "there is none" drops those) annotates a fresh set of
  unlabelled PNGs with that checkpoint; its masks are scored against the ground truth
  (`annotation_miou`: per image and name present, IoU of the name's mask with the union of the objects
  of that name, 0 when the engine kept no mask; the mean), and the checkpoint's referring cIoU on a
  labelled held-out set is measured (`heldout_ciou`, LISA's cIoU, model/metrics.py);
- round 1 continues from round 0's weights (fresh optimizer and schedule) on the seed set plus the
  engine-annotated set (each kept mask an object, its name a referring expression), the engine
  annotates the fresh set again as a derived output (`run --from`: only the x2sam stage reruns), and
  both figures are measured again.

Round 1 also trains for more steps than round 0, so the loop runs a control: the same continuation on
the seed set alone (`control_seed_only`). The engine data helped only where round 1 beats the control.
Budgets are in steps (the machine's speed is not known in advance). The last stdout line is one JSON
object; each figure is the mean over the model seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groundmill.model.config import SourceConfig, TrainConfig, load_config
from groundmill.model.metrics import ciou_giou
from groundmill.model.mllm import load_processor
from groundmill.model.predict import load_for_eval, predict
from groundmill.model.records import eval_records
from groundmill.model.synthetic import TRAIN_KINDS, make_image, write_split
from groundmill.model.tasks import ANSWER, QUESTIONS, referring_targets
from groundmill.model.train import build_model, load_checkpoint, make_optimizer, save_checkpoint, train
from groundmill.pipeline.cli import main as groundmill
from groundmill.schema import STATUS_OK, content_key, decode_mask, mask_bbox
from groundmill.shards import SHARDS_DIR, ShardWriter, fresh_scratch_dir, iter_shard

TINY = Path(__file__).resolve().parent.parent / "manifests" / "train_tiny.yaml"
# The closed world's vocabulary, asked of every image: the pairs its scenes are made of (make_image's
# training split), most of them absent from any one image.
NAMES = [f"{c} {s}" for c, s in TRAIN_KINDS]


def write_unlabelled(folder: Path, n: int, seed: int) -> dict[str, list[dict]]:
    """n synthetic scenes as plain PNG files (what the engine sees); returns their ground truth by
    content key (the engine's sample key): the objects with their masks."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, truth = random.Random(seed), {}
    for i in range(n):
        data, fields = make_image(rng)
        (folder / f"scene{i:05d}.png").write_bytes(data)
        truth[content_key(data)] = fields["objects"]
    return truth


def engine_manifest(path: Path, inputs: Path, threshold: float) -> Path:
    path.write_text(
        "run: {name: loop, seed: 0}\n"
        f"inputs: [{inputs}]\n"
        "output: {dir: out/loop/annotated, image_format: png}\n"  # lossless: masks meet the true pixels
        "ray: {num_cpus: 2}\nload: {num_cpus: 0.5, batch_size: 16}\n"
        "stages:\n  x2sam:\n    model: {id: none, device: cpu}\n"
        "    resources: {num_cpus: 1, batch_size: 16}\n"
        f"    params: {{sources: [], phrases: {json.dumps(NAMES)}, min_score: {threshold}}}\n"
    )
    return path


def engine_records(out: Path) -> list[tuple[str, bytes, dict]]:
    """(key, stored PNG, record) of every sample the engine wrote."""
    return [(key, files["png"], json.loads(files["json"])) for tar in sorted((out / SHARDS_DIR).glob("*.tar"))
            for key, files in iter_shard(tar)]  # fmt: skip


def annotation_miou(out: Path, truth: dict[str, list[dict]]) -> float:
    ious = []
    for key, _, record in engine_records(out):
        kept = {e["text"]: decode_mask(e["segmentation"]) for e in record.get("x2sam", [])}
        union: dict[str, np.ndarray] = {}
        for obj in truth[key]:
            mask = decode_mask(obj["segmentation"])
            name = obj["labels"][0]
            union[name] = union[name] | mask if name in union else mask
        for name, gt in union.items():
            pred = kept.get(name, np.zeros_like(gt))
            ious.append(float((pred & gt).sum() / max(1, (pred | gt).sum())))
    return statistics.mean(ious)


def write_pseudo_labels(out: Path, dest: Path) -> int:
    """The engine's masks as training shards: each kept mask an object, its name a referring expression."""
    writer, n = ShardWriter(dest, name="engine-pseudo-00000"), 0
    for key, png, record in engine_records(out):
        entries = record.get("x2sam", [])
        if not entries:
            continue
        record["objects"] = [
            {"id": i, "bbox": mask_bbox(e["segmentation"]), "labels": [e["text"]], "attributes": [],
             "score": e["score"], "detectors": ["x2sam"], "segmentation": e["segmentation"],
             "segmentation_source": e["segmentation_source"]}
            for i, e in enumerate(entries)
        ]  # fmt: skip
        record["referring_expressions"] = [
            {"object_id": i, "expression": e["text"], "source": "x2sam"} for i, e in enumerate(entries)
        ]
        row = {"uri": record["source"]["uri"], "media_type": "image", "status": STATUS_OK}
        writer.add_sample(key, png, "png", record, row)
        n += 1
    writer.commit()  # nothing kept: no shard (round 1 then trains on the seed set alone)
    return n


def heldout_ciou(cfg: TrainConfig, ckpt: Path, heldout: Path) -> float:
    """Referring cIoU of a checkpoint on every expression of a labelled held-out split."""
    model, processor = load_for_eval(cfg, ckpt)
    size, rows, gts = cfg.vision.image_size, [], []
    for record, frames in eval_records([SourceConfig(path=str(heldout))], size):
        for expression, mask in referring_targets(record, size):
            rows.append({"question": QUESTIONS["referring"].format(expression), "answer": ANSWER,
                         "masks": [[mask]], "frames": frames})  # fmt: skip
            gts.append(mask)
    preds = predict(model, rows, processor, cfg, torch.device("cpu"))
    return ciou_giou([p[0, 0] > 0 for p in preds], gts)["cIoU"]


def warm_start(ckpt: Path, cfg: TrainConfig, dest: Path) -> Path:
    """A checkpoint at step 0 holding `ckpt`'s weights and tokenizer with a fresh optimizer, for
    `train(..., resume=)`: round 1 continues round 0's model on its new data, its own schedule."""
    processor = load_processor(ckpt)
    model = build_model(cfg, processor)
    load_checkpoint(ckpt, model)
    state = {"step": 0, "batches": 0, "seconds": 0.0, "data": {}}
    save_checkpoint(dest, model, make_optimizer(model, cfg.optim), state, processor, cfg)
    return dest


def train_config(out: Path, seed: int, sources: list[Path], steps: int, extra: list[str]) -> TrainConfig:
    data = ", ".join(f"{{path: {s}}}" for s in sources)
    return load_config(TINY, [f"out_dir={out}", f"seed={seed}", f"data.train=[{data}]", "data.val=[]",
                              f"optim.max_steps={steps}", "optim.max_seconds=0",
                              "ckpt_every=100000", *extra])  # fmt: skip


def annotate(manifest: Path, ckpt: Path, out: Path, parent: Path | None = None) -> None:
    args = ["run", str(manifest), "--output", str(out), f"stages.x2sam.model.id={ckpt}"]
    code = groundmill(args + (["--from", str(parent)] if parent else []))
    if code:
        raise SystemExit(f"groundmill run failed ({code})")


def one_seed(root: Path, seed: int, a: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    run = root / f"seed-{seed}"
    run.mkdir(parents=True)
    torch.set_num_threads(a.threads)  # the held-out eval's threads; training's come from `threads=`
    manifest = engine_manifest(run / "engine.yaml", data["fresh"], a.min_score)
    cfg0 = train_config(run / "round0", seed, [data["seed_set"]], a.steps0, a.overrides)
    ckpt0 = train(cfg0)
    annotate(manifest, ckpt0, run / "annotated0")
    r0 = {"round": 0, "annotation_miou": annotation_miou(run / "annotated0", data["truth"]),
          "heldout_ciou": heldout_ciou(cfg0, ckpt0, data["heldout"])}  # fmt: skip
    pseudo = run / "pseudo0"
    r0["engine_annotated_images"] = write_pseudo_labels(run / "annotated0", pseudo)
    print(f"seed {seed}: {json.dumps(r0)}", flush=True)

    sources = [data["seed_set"], pseudo] if r0["engine_annotated_images"] else [data["seed_set"]]
    cfg1 = train_config(run / "round1", seed, sources, a.steps1, a.overrides)
    ckpt1 = train(cfg1, resume=str(warm_start(ckpt0, cfg1, run / "warm" / "round1")))
    annotate(manifest, ckpt1, run / "annotated1", parent=run / "annotated0")
    r1 = {"round": 1, "annotation_miou": annotation_miou(run / "annotated1", data["truth"]),
          "heldout_ciou": heldout_ciou(cfg1, ckpt1, data["heldout"])}  # fmt: skip
    print(f"seed {seed}: {json.dumps(r1)}", flush=True)
    result = {"rounds": [r0, r1]}
    if a.control:
        cfgc = train_config(run / "control", seed, [data["seed_set"]], a.steps1, a.overrides)
        ckptc = train(cfgc, resume=str(warm_start(ckpt0, cfgc, run / "warm" / "control")))
        annotate(manifest, ckptc, run / "annotated_control", parent=run / "annotated0")
        result["control"] = {"annotation_miou": annotation_miou(run / "annotated_control", data["truth"]),
                             "heldout_ciou": heldout_ciou(cfgc, ckptc, data["heldout"])}  # fmt: skip
        print(f"seed {seed}: control {json.dumps(result['control'])}", flush=True)
    return result


def summarise(per_seed: list[dict[str, Any]], seeds: list[int], seconds: float) -> dict[str, Any]:
    keys = ("annotation_miou", "heldout_ciou")
    rounds = [
        {"round": r, **{k: round(statistics.mean(s["rounds"][r][k] for s in per_seed), 4) for k in keys}}
        for r in (0, 1)
    ]
    result: dict[str, Any] = {"rounds": rounds, "seeds": seeds}
    result["margin"] = {k: round(rounds[1][k] - rounds[0][k], 4) for k in keys}
    result["round1_beats_round0"] = all(v > 0 for v in result["margin"].values())
    if all("control" in s for s in per_seed):
        control = {k: round(statistics.mean(s["control"][k] for s in per_seed), 4) for k in keys}
        result["control_seed_only"] = control
        result["margin_over_control"] = {k: round(rounds[1][k] - control[k], 4) for k in keys}
    result["per_seed"] = per_seed
    result["seconds"] = round(seconds, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="groundmill loop", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/loop")
    p.add_argument("--seed-images", type=int, default=300, help="labelled images round 0 trains on")
    p.add_argument("--fresh-images", type=int, default=200, help="unlabelled images the engine annotates")
    p.add_argument("--heldout-images", type=int, default=100)
    p.add_argument("--steps0", type=int, default=1500, help="round 0 training steps (a budget in work)")
    p.add_argument("--steps1", type=int, default=750, help="round 1 steps, continuing round 0's model")
    p.add_argument("--min-score", type=float, default=0.6, help="the engine keeps masks scoring this much")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--no-control", dest="control", action="store_false", help="skip the seed-only control")
    p.add_argument("--jobs", type=int, default=0,
                   help="seeds run at once, sharing the CPU threads (default: every seed at once)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key.sub=value trainer config overrides")
    a = p.parse_intermixed_args(argv)
    root = Path(a.out)
    fresh_scratch_dir(root)  # always from scratch
    start = time.perf_counter()
    # Hard negatives in the seed set teach the model to answer "there is none", so the engine can drop the
    # names an image lacks (without them, 71% of the masks it kept were of absent names).
    write_split(root / "seed_set", a.seed_images, 0, seed=11, negatives=True)
    write_split(root / "heldout", a.heldout_images, 0, seed=13)
    data = {"seed_set": root / "seed_set", "heldout": root / "heldout", "fresh": root / "fresh"}
    data["truth"] = write_unlabelled(data["fresh"], a.fresh_images, seed=12)
    # Seeds are independent, so they run side by side (as bench-train's do): on 2 cores two one-thread
    # trainers beat one two-thread trainer, and one seed's engine run overlaps the other's training.
    jobs = a.jobs or len(a.seeds)
    a.threads = max(1, (os.cpu_count() or 1) // jobs)
    a.overrides = [f"threads={a.threads}", *a.overrides]  # the user's own threads= still wins
    n = len(a.seeds)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_seed = list(pool.map(one_seed, [root] * n, a.seeds, [a] * n, [data] * n))
    print(json.dumps(summarise(per_seed, a.seeds, time.perf_counter() - start)))


if __name__ == "__main__":
    main()
