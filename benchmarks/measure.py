"""How the benchmarks measure: real photos as inputs, runs in fresh child processes whose whole
process tree is sampled for memory, and one pipeline or baseline run per child.

    .venv/bin/python -m groundmill.benchmarks.measure MANIFEST --input DIR --output DIR --json FILE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png")
INPUT_SIZE = (320, 240)


def make_inputs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct real photos (random crops of scikit-image's bundled photos), 320x240 JPEG."""
    import skimage

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(Path(skimage.__file__).parent / "data" / p).convert("RGB") for p in PHOTOS]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        path = folder / f"img{i:05d}.jpg"
        photo.crop((x, y, x + cw, y + ch)).resize(INPUT_SIZE).save(path, quality=90)
        paths.append(path)
    return paths


class TreeRss:
    """Samples the summed RSS of a process and all its descendants; `peak` is the maximum seen.

    Summed RSS counts shared pages (torch's libraries, Ray's object store) once per process that
    maps them, so it overstates a many-process pipeline; `peak_pss` (proportional set size, shared
    pages split among their users) is the tree's physical memory.
    """

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s, self.peak, self.peak_pss = pid, interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_child(args: list[str], result: Path) -> dict[str, Any]:
    """Run `python -m <args>` in a fresh process; its JSON result plus the tree's peak RSS (MiB)."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeRss(proc.pid) as rss:
        _, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        **json.loads(result.read_text()),
        "peak_rss_mib": rss.peak / 2**20,
        "peak_pss_mib": rss.peak_pss / 2**20,
    }


# ---------------------------------------------------------------------------------------------------------
# One pipeline run (in its own process, so Ray's processes are its descendants).


def stage_busy(out: Path) -> dict[str, float]:
    """Per stage: busy seconds per sample, from the index's per-sample timings."""
    from groundmill.pipeline.plan import timing_pairs
    from groundmill.shards import read_index

    totals: dict[str, list[float]] = {}
    for timings in read_index(out, columns=["timings"]).column("timings").to_pylist():
        for stage, seconds in timing_pairs(timings):
            totals.setdefault(stage, []).append(seconds)
    return {stage: float(np.mean(v)) for stage, v in totals.items()}


def main(argv: list[str] | None = None) -> None:
    """Child: Ray start-up, then the timed run; writes {seconds, inputs, ok, stage_busy_s}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    import ray

    from groundmill.pipeline.config import load_config
    from groundmill.pipeline.run import init_ray, run_pipeline
    from groundmill.shards import read_index

    overrides = [f"inputs={json.dumps([args.input])}", f"output.dir={args.output}", *args.overrides]
    cfg = load_config(args.manifest, overrides)
    init_ray(cfg)  # a cluster is started once, not per dataset: not part of the measured time
    start = time.perf_counter()
    run_pipeline(cfg)
    seconds = time.perf_counter() - start
    ray.shutdown()
    out = Path(args.output)
    index = read_index(out, columns=["status"]).column("status").to_pylist()
    result = {
        "seconds": seconds,
        "inputs": len(index),
        "ok": index.count("ok"),
        "stage_busy_s": stage_busy(out),
    }
    Path(args.json).write_text(json.dumps(result))


def run_pipeline_measured(manifest: str, inputs: Path, work: Path, tag: str, overrides: list[str]) -> dict:
    out, result = work / f"out-{tag}", work / f"{tag}.json"
    shutil.rmtree(out, ignore_errors=True)
    args = ["groundmill.benchmarks.measure", manifest, "--input", str(inputs), "--output", str(out)]
    r = run_child([*args, "--json", str(result), *overrides], result)
    r["samples_per_s"] = r["inputs"] / r["seconds"]
    return r


def run_baseline_measured(manifest: str, inputs: Path, work: Path) -> dict:
    shutil.rmtree(work / "baseline", ignore_errors=True)
    result = work / "baseline.json"
    args = [
        "groundmill.benchmarks.baseline",
        manifest,
        "--input",
        str(inputs),
        "--work",
        str(work / "baseline"),
    ]
    r = run_child([*args, "--json", str(result)], result)
    r["samples_per_s"] = r["inputs"] / r["seconds"]
    return r


if __name__ == "__main__":
    main()
