"""`make bench`: the engine's speed, scale and memory as ratios measured side by side in one run.

    .venv/bin/python -m benchmarks.run [--manifest manifests/bench.yaml] [--n 128] [--memory-n 30]

1. pipeline vs the GranD-style sequential baseline (benchmarks/baseline.py) on the same inputs,
   stages and models: end-to-end throughput ratio and peak memory of each;
   pipeline vs ideal: steady-state pipeline throughput over the ideal computed from each stage's
   isolated model time on the same inputs (the baseline's per-stage process time). Steady state is
   the marginal throughput between runs on N and 2N inputs, N / (T(2N) - T(N)), which cancels
   Ray and actor start-up and the pipeline's fill and drain. N (128) makes a run one of work rather
   than of start-up: the pipeline pays ~18 s here for Ray workers importing torch and loading
   every model, the baseline ~6 s for loading them in its one process;
2. scaling: throughput with 1 vs 2 workers for the busiest graph operator (a stage, or a group of
   stages sharing actors; every worker holds its models), and the cluster model of
   benchmarks/SCALING.md fed with the measured per-stage busy times;
3. memory: peak RSS (and PSS) of the whole process tree (driver + Ray) for N and 10N inputs;
4. writer: ShardWriter MB/s vs raw sequential write + fsync on the same disk;
5. GPU busy share when a CUDA device is present (skipped otherwise).

Every run happens in a fresh subprocess whose process tree is sampled for RSS. Prints a table,
then ONE JSON object on the last line.
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
    from groundmill.shards import read_index

    totals: dict[str, list[float]] = {}
    for timings in read_index(out, columns=["timings"]).column("timings").to_pylist():
        for t in timings or []:
            totals.setdefault(t["stage"], []).append(t["seconds"])
    return {stage: float(np.mean(v)) for stage, v in totals.items()}


def pipeline_once(argv: list[str]) -> None:
    """Child: Ray start-up, then the timed run; writes {seconds, inputs, ok, stage_busy_s}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
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
    args = ["benchmarks.run", "_pipeline", manifest, "--input", str(inputs), "--output", str(out)]
    r = run_child([*args, "--json", str(result), *overrides], result)
    r["samples_per_s"] = r["inputs"] / r["seconds"]
    return r


def run_baseline_measured(manifest: str, inputs: Path, work: Path) -> dict:
    shutil.rmtree(work / "baseline", ignore_errors=True)
    result = work / "baseline.json"
    args = ["benchmarks.baseline", manifest, "--input", str(inputs), "--work", str(work / "baseline")]
    r = run_child([*args, "--json", str(result)], result)
    r["samples_per_s"] = r["inputs"] / r["seconds"]
    return r


# ---------------------------------------------------------------------------------------------------------
# Writer vs disk.


def _write_shards(folder: Path, payload: bytes, n: int, shard_mb: int) -> tuple[int, float]:
    """`n` samples through ShardWriter (tar built in memory, atomic commit with fsync): bytes, seconds."""
    from groundmill.schema import content_key
    from groundmill.shards import ShardWriter

    start = time.perf_counter()
    writer, written = ShardWriter(folder), 0
    for i in range(n):
        key = content_key(i.to_bytes(8, "little"))
        record = {"key": key, "media": {"type": "image", "ext": "jpg", "width": 320, "height": 240}}
        writer.add_sample(key, payload, "jpg", record, {"uri": f"img{i}.jpg", "status": "ok"})
        if writer.nbytes >= shard_mb * 2**20:
            written += writer.nbytes
            writer.commit()
            writer = ShardWriter(folder)
    written += writer.nbytes
    writer.commit()
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return written, seconds


def _write_raw(path: Path, payload: bytes, n: int, shard_mb: int) -> tuple[int, float]:
    """The same bytes written sequentially to one file, fsynced as often as the shards are."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(payload)
            if f.tell() % (shard_mb * 2**20) == 0:
                f.flush()
                os.fsync(f.fileno())
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return n * len(payload), seconds


def writer_vs_disk(
    folder: Path, total_mb: int = 128, shard_mb: int = 64, repeats: int = 3
) -> dict[str, float]:
    """Best-of-`repeats` MB/s of the shard writer vs a raw sequential write, interleaved on the same
    disk (interleaving and best-of keep other load on the machine from favouring either)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = (
        np.random.default_rng(0).integers(0, 256, 256 * 1024, dtype=np.uint8).tobytes()
    )  # a 256 KiB "image"
    n = total_mb * 4
    _write_shards(folder / "warm-up", payload, 1, shard_mb)  # one-time imports are not write speed
    writer_mbps = disk_mbps = 0.0
    for _ in range(repeats):
        nbytes, seconds = _write_shards(folder / "shards", payload, n, shard_mb)
        writer_mbps = max(writer_mbps, nbytes / 2**20 / seconds)
        nbytes, seconds = _write_raw(folder / "raw.bin", payload, n, shard_mb)
        disk_mbps = max(disk_mbps, nbytes / 2**20 / seconds)
    return {"writer_mb_per_s": writer_mbps, "disk_mb_per_s": disk_mbps, "ratio": writer_mbps / disk_mbps}


# ---------------------------------------------------------------------------------------------------------
# GPU and the cluster model.


def gpu_busy_share(manifest: str, inputs: Path, work: Path) -> dict[str, Any]:
    """Device utilisation sampled with nvidia-smi during a pipeline run with GPU stages."""
    try:
        import torch

        has_gpu = torch.cuda.is_available() and shutil.which("nvidia-smi") is not None
    except ImportError:
        has_gpu = False
    if not has_gpu:
        return {"skipped": "no CUDA device"}
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True,
            )  # fmt: skip
            samples.extend(float(v) for v in out.stdout.split() if v.strip())
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        r = run_pipeline_measured(manifest, inputs, work, "gpu", gpu_overrides(manifest))
    finally:
        stop.set()
        thread.join()
    busy = r["stage_busy_s"]
    wall = r["seconds"] / r["inputs"]
    return {
        "device_utilisation_mean": float(np.mean(samples)) / 100 if samples else None,
        "stage_busy_share": {s: t / wall for s, t in busy.items()},
        "samples_per_s": r["samples_per_s"],
    }


def model_stages(manifest: str) -> list[str]:
    from groundmill.pipeline.config import load_config
    from groundmill.stages import stage_class

    cfg = load_config(manifest, ["inputs=[.]"])
    return [n for n, s in cfg.stages.items() if s.enabled and stage_class(s.type or n).uses_model]


def segment_overrides(manifest: str, names: set[str] | None, **resources: float) -> list[str]:
    """Overrides setting resources of the named graph operators (a group, or a stage alone), or of
    every operator that holds a model when `names` is None."""
    from groundmill.pipeline.config import load_config, segments

    cfg = load_config(manifest, ["inputs=[.]"])
    out = []
    for seg in segments(cfg):
        if (seg.name in names) if names is not None else seg.uses_model:
            prefix = f"groups.{seg.name}" if seg.name in cfg.groups else f"stages.{seg.name}.resources"
            out += [f"{prefix}.{key}={value}" for key, value in resources.items()]
    return out


def busiest_segments(manifest: str, busy_s: dict[str, float], k: int) -> list[str]:
    """The `k` graph operators with the most busy time per sample (their stages' sum)."""
    from groundmill.pipeline.config import load_config, segments

    busy = {
        seg.name: sum(busy_s.get(s, 0.0) for s in seg.stages)
        for seg in segments(load_config(manifest, ["inputs=[.]"]))
    }
    return sorted(busy, key=busy.get, reverse=True)[:k]


def gpu_overrides(manifest: str) -> list[str]:
    return segment_overrides(manifest, None, num_gpus=0.1)


def predict_throughput(
    busy_s: dict[str, float], gpu_stages: list[str], gpus: int, cpus: int, efficiency: float
) -> float:
    """The cluster model of SCALING.md: samples/s = efficiency * min(GPUs / GPU-seconds per sample,
    CPU cores / CPU-seconds per sample)."""
    gpu_work = sum(t for s, t in busy_s.items() if s in gpu_stages)
    cpu_work = sum(t for s, t in busy_s.items() if s not in gpu_stages)
    limits = [gpus / gpu_work if gpu_work else float("inf"), cpus / cpu_work if cpu_work else float("inf")]
    return efficiency * min(limits)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_pipeline":
        pipeline_once(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", default="manifests/bench.yaml", help="the stages to benchmark")
    parser.add_argument("--n", type=int, default=128, help="inputs for the pipeline/baseline/scaling runs")
    parser.add_argument("--memory-n", type=int, default=30, help="N of the N vs 10N memory runs")
    parser.add_argument("--memory-stages", default="tagging", help="stages kept for the memory runs")
    parser.add_argument(
        "--scale-stages", type=int, default=1, help="busiest operators run with 1 and 2 workers"
    )
    parser.add_argument("--work", default="out/bench")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    inputs, inputs_2n = work / "inputs", work / "inputs-2n"
    make_inputs(inputs_2n, 2 * args.n)
    inputs.mkdir()
    for p in sorted(inputs_2n.iterdir())[: args.n]:
        os.link(p, inputs / p.name)
    # Other work on the machine skews every timing (multi-threaded torch most): recorded for the reader.
    results: dict[str, Any] = {
        "n": args.n, "manifest": args.manifest, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]
    }  # fmt: skip

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log(f"sequential baseline on {args.n} inputs")
    baseline = run_baseline_measured(args.manifest, inputs, work)
    log("pipeline, as configured")
    one = run_pipeline_measured(args.manifest, inputs, work, "w1", [])
    log(f"pipeline on {2 * args.n} inputs")
    one_2n = run_pipeline_measured(args.manifest, inputs_2n, work, "w1-2n", [])
    steady = args.n / max(one_2n["seconds"] - one["seconds"], 1e-9)
    # Each worker is a process holding its models: scaling only the busiest operators keeps the runs
    # within this machine's memory.
    busiest = busiest_segments(args.manifest, one["stage_busy_s"], args.scale_stages)
    scaling = {}
    for workers in (1, 2):
        log(f"pipeline, {workers} worker(s) for {', '.join(busiest)}")
        overrides = segment_overrides(args.manifest, set(busiest), min_actors=workers, max_actors=workers)
        scaling[workers] = run_pipeline_measured(args.manifest, inputs, work, f"w{workers}", overrides)
        scaling[workers]["scaled"] = busiest

    model_s = sum(v["process_s"] for s, v in baseline["stages"].items() if s != "load")
    ideal = baseline["inputs"] / model_s
    results["baseline"] = baseline
    results["pipeline"] = one
    results["pipeline_1_worker"], results["pipeline_2_workers"] = scaling[1], scaling[2]
    results["ideal_samples_per_s"] = ideal
    results["pipeline_vs_sequential"] = one["samples_per_s"] / baseline["samples_per_s"]
    results["pipeline_2n"] = one_2n
    results["pipeline_steady_samples_per_s"] = steady
    results["pipeline_vs_ideal"] = steady / ideal
    results["pipeline_e2e_vs_ideal"] = one["samples_per_s"] / ideal
    # Both without start-up: the pipeline's steady state vs the baseline's time less model loading.
    baseline_work_s = baseline["seconds"] - sum(v["setup_s"] for v in baseline["stages"].values())
    results["pipeline_vs_sequential_steady"] = steady / (baseline["inputs"] / baseline_work_s)
    results["memory_pipeline_vs_sequential"] = one["peak_rss_mib"] / baseline["peak_rss_mib"]
    results["pss_pipeline_vs_sequential"] = one["peak_pss_mib"] / baseline["peak_pss_mib"]
    results["two_vs_one_worker"] = scaling[2]["samples_per_s"] / scaling[1]["samples_per_s"]

    memory_in = work / "memory-inputs"
    make_inputs(memory_in, 10 * args.memory_n, seed=1)
    small = work / "memory-small"
    small.mkdir()
    for p in sorted(memory_in.iterdir())[: args.memory_n]:
        os.link(p, small / p.name)
    keep = set(args.memory_stages.split(","))
    from groundmill.pipeline.config import load_config

    disable = [
        f"stages.{s}.enabled=false"
        for s in load_config(args.manifest, ["inputs=[.]"]).stages
        if s not in keep
    ]
    log(f"memory: {args.memory_n} inputs ({args.memory_stages})")
    mem_n = run_pipeline_measured(args.manifest, small, work, "mem-n", disable)
    log(f"memory: {10 * args.memory_n} inputs")
    mem_10n = run_pipeline_measured(args.manifest, memory_in, work, "mem-10n", disable)
    results["memory"] = {"n": mem_n, "10n": mem_10n}
    results["rss_10n_over_n"] = mem_10n["peak_rss_mib"] / mem_n["peak_rss_mib"]

    log("writer vs disk")
    results["writer"] = writer_vs_disk(work / "writer")
    results["writer_vs_disk"] = results["writer"]["ratio"]
    results["gpu"] = gpu_busy_share(args.manifest, inputs, work)

    efficiency = min(1.0, results["pipeline_vs_ideal"])
    gpu_stages = model_stages(args.manifest)
    results["cluster_model"] = {
        f"{g}_gpus_{8 * g}_cpus": predict_throughput(one["stage_busy_s"], gpu_stages, g, 8 * g, efficiency)
        for g in (1, 8, 64)
    }
    results["load_avg_end"] = os.getloadavg()[0]
    print_table(results)
    print(json.dumps(results, default=float))
    return 0


def print_table(r: dict[str, Any]) -> None:
    b, p, p1, p2 = r["baseline"], r["pipeline"], r["pipeline_1_worker"], r["pipeline_2_workers"]
    m = r["memory"]
    rows = [
        ("sequential baseline", f"{b['samples_per_s']:.3f} samples/s", f"peak RSS {b['peak_rss_mib']:.0f} MiB, PSS {b['peak_pss_mib']:.0f}"),
        ("pipeline (as configured)", f"{p['samples_per_s']:.3f} samples/s", f"peak RSS {p['peak_rss_mib']:.0f} MiB, PSS {p['peak_pss_mib']:.0f}"),
        ("pipeline steady state", f"{r['pipeline_steady_samples_per_s']:.3f} samples/s", "N / (T(2N) - T(N))"),
        ("ideal (isolated model time)", f"{r['ideal_samples_per_s']:.3f} samples/s", ""),
        (f"pipeline (1 worker: {', '.join(p1['scaled'])})", f"{p1['samples_per_s']:.3f} samples/s",
         f"peak RSS {p1['peak_rss_mib']:.0f} MiB, PSS {p1['peak_pss_mib']:.0f}"),
        (f"pipeline (2 workers: {', '.join(p2['scaled'])})", f"{p2['samples_per_s']:.3f} samples/s",
         f"peak RSS {p2['peak_rss_mib']:.0f} MiB, PSS {p2['peak_pss_mib']:.0f}"),
        ("pipeline / sequential", f"{r['pipeline_vs_sequential']:.2f}x", "end to end, target >= 1.0"),
        ("pipeline / sequential, no start-up", f"{r['pipeline_vs_sequential_steady']:.2f}x", "steady vs baseline less model loading"),
        ("pipeline steady / ideal", f"{r['pipeline_vs_ideal']:.2f}x", "target >= 0.85"),
        ("pipeline e2e / ideal", f"{r['pipeline_e2e_vs_ideal']:.2f}x", "includes actor start-up"),
        ("2 workers / 1 worker", f"{r['two_vs_one_worker']:.2f}x", "end to end"),
        ("peak RSS pipeline / sequential", f"{r['memory_pipeline_vs_sequential']:.2f}x", "summed over processes"),
        ("peak PSS pipeline / sequential", f"{r['pss_pipeline_vs_sequential']:.2f}x", "shared pages counted once"),
        (f"peak RSS {10 * r['memory']['n']['inputs'] // 10} vs {m['10n']['inputs']} inputs",
         f"{m['n']['peak_rss_mib']:.0f} / {m['10n']['peak_rss_mib']:.0f} MiB", f"{r['rss_10n_over_n']:.2f}x (target <= 1.2)"),
        ("shard writer / raw disk", f"{r['writer']['writer_mb_per_s']:.0f} / {r['writer']['disk_mb_per_s']:.0f} MB/s",
         f"{r['writer_vs_disk']:.2f}x"),
        ("GPU busy share", json.dumps(r["gpu"])[:60], ""),
    ]  # fmt: skip
    rows += [
        (f"cluster model: {k}", f"{v:.2f} samples/s", "SCALING.md") for k, v in r["cluster_model"].items()
    ]
    width = max(len(a) for a, _, _ in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b_:<28} {c}" for a, b_, c in rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
