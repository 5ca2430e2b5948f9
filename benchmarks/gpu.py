"""The GPU check (not in CI): `manifests/grand.yaml` over the offline fixture hub on generated images.

    .venv/bin/python -m groundmill.benchmarks.gpu [--images 300] [--agreement-images 32] [--work out/bench-gpu]

Prints, then one JSON line:
- per stage, seconds per image (GPU-synchronised: `pipeline.graph` synchronises CUDA before it stops a
  stage's clock) and GPU-seconds per image (times the GPUs its actor holds);
- the bottleneck stage's GPU busy share: its summed busy time over (wall-clock x its actors);
- peak GPU memory per actor (each actor's `torch.cuda.max_memory_allocated`, in the index stats);
- bf16 vs fp32 agreement on a subset: the same run with every stage in float32, compared per sample
  (top tag, detection counts, mask IoU of objects with the same box).

The fixture hub holds random weights, so these are costs and agreement of the real model classes at
the real sizes and dtypes, not annotation quality. Without a CUDA device it prints `skipped`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from groundmill.benchmarks.measure import make_inputs

MANIFEST = "manifests/grand.yaml"


def run(manifest: str, inputs: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    from groundmill.pipeline.config import load_config
    from groundmill.pipeline.run import run_pipeline

    cfg = load_config(manifest, [f"inputs=[{inputs}]", f"output.dir={out}", *overrides])
    record = run_pipeline(cfg)
    return {"cfg": cfg, "seconds": record["attempts"][-1].get("seconds", 0.0)}


def stage_figures(cfg: Any, out: Path, seconds: float) -> dict[str, Any]:
    from groundmill.benchmarks.cluster import gpu_stage_figures
    from groundmill.benchmarks.measure import stat_pairs
    from groundmill.pipeline.config import segments
    from groundmill.shards import read_index

    rows = read_index(out, columns=["media_type", "timings", "stats"]).to_pylist()
    peaks: dict[str, float] = defaultdict(float)
    for r in rows:
        for key, value in stat_pairs(r["stats"]):
            if key.startswith("gpu_peak_mib."):
                name = key.removeprefix("gpu_peak_mib.")
                peaks[name] = max(peaks[name], value)
    resources = {name: seg.stage_resources(name) for seg in segments(cfg) for name in seg.stages}
    stages = gpu_stage_figures(rows, {n: r.num_gpus for n, r in resources.items()}, seconds,
                               {n: r.max_actors for n, r in resources.items()})  # fmt: skip
    for name, figures in stages.items():
        figures["actors"] = resources[name].max_actors
    gpu_stages = {n: s for n, s in stages.items() if s["gpu_s_per_image"] > 0}
    bottleneck = max(gpu_stages or stages, key=lambda n: stages[n]["s_per_image"] / stages[n]["actors"])
    return {"stages": stages, "bottleneck": bottleneck, "bottleneck_busy_share": stages[bottleneck]["busy_share"],
            "peak_gpu_mib_per_actor": dict(peaks)}  # fmt: skip


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Per sample of two runs: same top tag, same detection counts, mask IoU of same-box objects."""
    from groundmill.schema import decode_mask
    from groundmill.shards import iter_shard

    def records(out: Path) -> dict[str, dict]:
        return {
            k: json.loads(f["json"]) for t in sorted((out / "shards").glob("*.tar")) for k, f in iter_shard(t)
        }

    ra, rb = records(a), records(b)
    tags, counts, ious = [], [], []
    for key in ra.keys() & rb.keys():
        x, y = ra[key], rb[key]
        tags.append(x.get("tags", [{}])[:1] == y.get("tags", [{}])[:1])
        counts.append({k: len(v) for k, v in x.get("detections", {}).items()}
                      == {k: len(v) for k, v in y.get("detections", {}).items()})  # fmt: skip
        by_box = {tuple(o["bbox"]): o for o in y.get("objects", []) if "segmentation" in o}
        for o in x.get("objects", []):
            if "segmentation" in o and tuple(o["bbox"]) in by_box:
                m1, m2 = decode_mask(o["segmentation"]), decode_mask(by_box[tuple(o["bbox"])]["segmentation"])
                union = np.logical_or(m1, m2).sum()
                ious.append(np.logical_and(m1, m2).sum() / union if union else 1.0)
    return {"samples": len(tags), "top_tag_equal": float(np.mean(tags)) if tags else float("nan"),
            "detection_counts_equal": float(np.mean(counts)) if counts else float("nan"),
            "mask_iou_mean": float(np.mean(ious)) if ious else float("nan"), "masks_compared": len(ious)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--agreement-images", type=int, default=32)
    parser.add_argument("--work", default="out/bench-gpu")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from groundmill.pipeline.cli import main as cli

    work = Path(args.work).resolve()
    hub = work / "hub"
    if cli(["fixture", "hub", str(hub)]):
        return 1
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub))
    make_inputs(work / "inputs", args.images)
    main_run = run(args.manifest, work / "inputs", work / "out", [])
    result = stage_figures(main_run["cfg"], work / "out", main_run["seconds"])
    result |= {"images": args.images, "seconds": main_run["seconds"], "device": torch.cuda.get_device_name()}
    subset = work / "agreement-inputs"
    make_inputs(subset, args.agreement_images, seed=7)
    bf16 = run(args.manifest, subset, work / "bf16", [])
    fp32 = [f"stages.{n}.model.dtype=float32" for n in bf16["cfg"].stages]
    run(args.manifest, subset, work / "fp32", fp32)
    result["bf16_vs_fp32"] = agreement(work / "bf16", work / "fp32")
    for name, s in sorted(result["stages"].items(), key=lambda kv: -kv[1]["gpu_s_per_image"]):
        print(
            f"{name:<24} {s['s_per_image']:8.4f} s/image  {s['gpu_s_per_image']:8.4f} GPU-s/image  busy {s['busy_share']:.2f}"
        )
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
