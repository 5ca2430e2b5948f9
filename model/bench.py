"""`make bench-train`: the synthetic proof of learning.

Writes train and held-out synthetic shards (model/synthetic.py), trains the tiny config from scratch
within a wall-clock budget, evaluates the held-out split and prints referring cIoU and video J&F next to
the "segment every object regardless of the words" baseline. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from groundmill.model.config import load_config
from groundmill.model.eval import evaluate
from groundmill.model.synthetic import write_split
from groundmill.model.train import train

TINY = Path(__file__).resolve().parent.parent / "manifests" / "train_tiny.yaml"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="groundmill bench-train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/bench_train")
    p.add_argument("--config", default=str(TINY))
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--videos", type=int, default=400)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--val-videos", type=int, default=60)
    p.add_argument("--train-seconds", type=float, default=540.0, help="training wall-clock budget")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    a = p.parse_intermixed_args(argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)  # always from scratch
    t0 = time.perf_counter()
    write_split(out / "train", a.images, a.videos, seed=1)
    write_split(out / "val", a.val_images, a.val_videos, seed=2)  # a different seed: held-out scenes
    print(f"synthetic shards written in {time.perf_counter() - t0:.1f}s", flush=True)
    cfg = load_config(
        a.config,
        [
            f"out_dir={out / 'run'}",
            f"data.train=[{{path: {out / 'train'}}}]",
            f"data.val=[{{path: {out / 'val'}}}]",
            f"optim.max_seconds={a.train_seconds}",
            f"eval_samples={max(a.val_images, a.val_videos)}",
            *a.overrides,
        ],
    )
    t1 = time.perf_counter()
    ckpt = train(cfg)
    train_seconds = time.perf_counter() - t1
    results = evaluate(cfg, ckpt)
    summary = {
        "ciou": results["referring"]["cIoU"],
        "giou": results["referring"]["gIoU"],
        "jf": results["video_referring"]["J&F"],
        "baseline_ciou": results["referring_baseline"]["cIoU"],
        "baseline_jf": results["video_referring_baseline"]["J&F"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "checkpoint": str(ckpt),
    }
    print(json.dumps(results, indent=1))
    print(f"referring cIoU {summary['ciou']:.3f} (baseline {summary['baseline_ciou']:.3f})")
    print(f"video J&F {summary['jf']:.3f} (baseline {summary['baseline_jf']:.3f})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
