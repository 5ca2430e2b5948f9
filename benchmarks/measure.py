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


# Child processes: no progress bars, and Ray given time to start on a loaded machine (the default
# 30 s raylet wait fails there).
QUIET_SLOW_START = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "RAY_raylet_start_wait_time_s": "300", "RAY_worker_register_timeout_seconds": "600"}  # fmt: skip


def photos() -> list[Image.Image]:
    import skimage

    return [Image.open(Path(skimage.__file__).parent / "data" / p).convert("RGB") for p in PHOTOS]


def random_crop(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random 60-100% crop of `photo`, resized to `size` (distinct bytes, real image statistics)."""
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize(size)


def make_inputs(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = INPUT_SIZE) -> list[Path]:
    """`n` distinct real photos (random crops of scikit-image's bundled photos), JPEG of `size`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bundled = photos()
    paths = []
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        random_crop(bundled[i % len(bundled)], rng, size).save(path, quality=90)
        paths.append(path)
    return paths


def _pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (cheap: one summary, not every mapping)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class IndexProgress:
    """How many index rows an output directory has committed so far (each part's row count once)."""

    def __init__(self, out: Path | None):
        self.out, self.rows, self._seen = out, 0, set()

    def __call__(self) -> int:
        if self.out is None:
            return 0
        import pyarrow.parquet as pq

        for part in (self.out / "index").glob("*.parquet"):  # committed parts only (temp files are hidden)
            if part.name not in self._seen:
                with contextlib.suppress(OSError, ValueError):
                    self.rows += pq.read_metadata(part).num_rows
                    self._seen.add(part.name)
        return self.rows


class TreeRss:
    """Samples a process (the driver) and all its descendants (Ray's processes) over time.

    Summed RSS counts shared pages (torch's libraries, Ray's object store) once per process that
    maps them, so it overstates a many-process pipeline; PSS (proportional set size, shared pages
    split among their users) is the tree's physical memory. `series` holds (seconds, driver RSS,
    tree RSS, tree PSS, committed index rows) per sample; `peak` and `peak_pss` the tree's maxima.
    """

    def __init__(self, pid: int, interval_s: float = 0.5, out: Path | None = None):
        self.pid, self.interval_s, self.peak, self.peak_pss = pid, interval_s, 0, 0
        self.series: list[tuple[float, int, int, int, int]] = []
        self._progress = IndexProgress(out)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                driver = root.memory_info().rss
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                    rss, pss = rss + p.memory_info().rss, pss + _pss_bytes(p.pid)
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self.series.append((time.perf_counter() - start, driver, rss, pss, self._progress()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_child(
    args: list[str], result: Path, out: Path | None = None, interval_s: float = 0.5
) -> dict[str, Any]:
    """Run `python -m <args>` in a fresh process; its JSON result plus the tree's peak RSS and PSS (MiB)
    and, with `out` (its output directory), the memory series against committed index rows."""
    env = {**os.environ, **QUIET_SLOW_START}
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeRss(proc.pid, interval_s, out) as rss:
        _, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    extra = {"memory_series": rss.series} if out is not None else {}
    return {
        **json.loads(result.read_text()),
        "peak_rss_mib": rss.peak / 2**20,
        "peak_pss_mib": rss.peak_pss / 2**20,
        "peak_driver_rss_mib": max((s[1] for s in rss.series), default=0) / 2**20,
        **extra,
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


def stat_pairs(stats: list[dict[str, Any]] | None) -> list[tuple[str, float]]:
    """An index row's `stats` (schema.STAT entries) as (name, value)."""
    return [(s["name"], s["value"]) for s in stats or []]


def pipeline_threads(out: Path) -> dict[str, float]:
    """Per graph operator: the intra-op threads its actors ran with (index stats `threads.<operator>`)."""
    from groundmill.shards import read_index

    threads: dict[str, float] = {}
    for stats in read_index(out, columns=["stats"]).column("stats").to_pylist():
        for key, value in stat_pairs(stats):
            if key.startswith("threads."):
                threads[key.removeprefix("threads.")] = max(
                    threads.get(key.removeprefix("threads."), 0), value
                )
    return threads


def commit_throughput(out: Path) -> float:
    """Steady-state samples/s from commit times (each index part's mtime): the least-squares slope of
    committed rows against time over every commit after the first. The first is left out: it carries
    the fill; the rows in flight at any moment shift the line, not its slope; the drain at the end
    can only lower it."""
    import pyarrow.parquet as pq

    parts = sorted(
        (p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (out / "index").glob("*.parquet")
    )
    points, rows = [], 0
    for mtime, n in parts:
        rows += n
        points.append((mtime, rows))
    points = points[1:]
    if len({t for t, _ in points}) < 2:
        return float("nan")
    mt, mr = sum(t for t, _ in points) / len(points), sum(r for _, r in points) / len(points)
    return sum((t - mt) * (r - mr) for t, r in points) / sum((t - mt) ** 2 for t, _ in points)


def start_ray(cfg: Any, attempts: int = 3) -> None:
    """pipeline.run.init_ray, retried: on a loaded machine Ray's fixed 30 s wait for its raylet can
    run out before the node registers."""
    import ray

    from groundmill.pipeline.run import init_ray

    for attempt in range(attempts):
        try:
            init_ray(cfg)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()
            time.sleep(5)


def main(argv: list[str] | None = None) -> None:
    """Child: Ray start-up, then the timed run; writes {seconds, inputs, ok, stage_busy_s, ...}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    import ray

    from groundmill.pipeline.config import load_config
    from groundmill.pipeline.run import run_pipeline
    from groundmill.shards import read_index

    overrides = [f"inputs={json.dumps([args.input])}", f"output.dir={args.output}", *args.overrides]
    cfg = load_config(args.manifest, overrides)
    start_ray(cfg)  # a cluster is started once, not per dataset: not part of the measured time
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
        "steady_samples_per_s": commit_throughput(out),
        "threads": pipeline_threads(out),
    }
    Path(args.json).write_text(json.dumps(result))


def run_pipeline_measured(
    manifest: str, inputs: Path, work: Path, tag: str, overrides: list[str], series: bool = False
) -> dict:
    """One pipeline run in a fresh process; with `series`, its memory over time (TreeRss.series)."""
    out, result = work / f"out-{tag}", work / f"{tag}.json"
    shutil.rmtree(out, ignore_errors=True)
    args = ["groundmill.benchmarks.measure", manifest, "--input", str(inputs), "--output", str(out)]
    r = run_child(
        [*args, "--json", str(result), *overrides], result, out if series else None, 1.0 if series else 0.5
    )
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
