"""`make bench`: the engine's speed, scale and memory as ratios measured side by side in one run.

    .venv/bin/python -m groundmill.benchmarks.run [--manifest manifests/bench.yaml] [--n 128] [--memory-n 30]

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
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from groundmill.benchmarks.cluster import (
    busiest_segments,
    gpu_busy_share,
    model_stages,
    predict_throughput,
    segment_overrides,
)
from groundmill.benchmarks.measure import make_inputs, run_baseline_measured, run_pipeline_measured
from groundmill.benchmarks.writer import writer_vs_disk


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def linked_subset(source: Path, folder: Path, n: int) -> Path:
    """A folder holding hard links to the first `n` inputs of `source` (the same files, no copies)."""
    folder.mkdir()
    for p in sorted(source.iterdir())[:n]:
        os.link(p, folder / p.name)
    return folder


def throughput(manifest: str, n: int, scale_stages: int, work: Path) -> dict[str, Any]:
    """1. pipeline vs the sequential baseline, steady state vs ideal; 2. 1 vs 2 workers."""
    inputs_2n = work / "inputs-2n"
    make_inputs(inputs_2n, 2 * n)
    inputs = linked_subset(inputs_2n, work / "inputs", n)
    log(f"sequential baseline on {n} inputs")
    baseline = run_baseline_measured(manifest, inputs, work)
    log("pipeline, as configured")
    one = run_pipeline_measured(manifest, inputs, work, "w1", [])
    log(f"pipeline on {2 * n} inputs")
    one_2n = run_pipeline_measured(manifest, inputs_2n, work, "w1-2n", [])
    steady = n / max(one_2n["seconds"] - one["seconds"], 1e-9)
    # Each worker is a process holding its models: scaling only the busiest operators keeps the runs
    # within this machine's memory.
    busiest = busiest_segments(manifest, one["stage_busy_s"], scale_stages)
    scaling = {}
    for workers in (1, 2):
        log(f"pipeline, {workers} worker(s) for {', '.join(busiest)}")
        overrides = segment_overrides(manifest, set(busiest), min_actors=workers, max_actors=workers)
        scaling[workers] = run_pipeline_measured(manifest, inputs, work, f"w{workers}", overrides)
        scaling[workers]["scaled"] = busiest

    ideal = baseline["inputs"] / sum(v["process_s"] for s, v in baseline["stages"].items() if s != "load")
    # Both without start-up: the pipeline's steady state vs the baseline's time less model loading.
    baseline_work_s = baseline["seconds"] - sum(v["setup_s"] for v in baseline["stages"].values())
    return {
        "baseline": baseline,
        "pipeline": one,
        "pipeline_1_worker": scaling[1],
        "pipeline_2_workers": scaling[2],
        "ideal_samples_per_s": ideal,
        "pipeline_vs_sequential": one["samples_per_s"] / baseline["samples_per_s"],
        "pipeline_2n": one_2n,
        "pipeline_steady_samples_per_s": steady,
        "pipeline_vs_ideal": steady / ideal,
        "pipeline_e2e_vs_ideal": one["samples_per_s"] / ideal,
        "pipeline_vs_sequential_steady": steady / (baseline["inputs"] / baseline_work_s),
        "memory_pipeline_vs_sequential": one["peak_rss_mib"] / baseline["peak_rss_mib"],
        "pss_pipeline_vs_sequential": one["peak_pss_mib"] / baseline["peak_pss_mib"],
        "two_vs_one_worker": scaling[2]["samples_per_s"] / scaling[1]["samples_per_s"],
    }


def memory(manifest: str, n: int, stages: str, work: Path) -> dict[str, Any]:
    """3. peak memory of the named stages on N and 10N inputs."""
    from groundmill.pipeline.config import load_config

    memory_in = work / "memory-inputs"
    make_inputs(memory_in, 10 * n, seed=1)
    small = linked_subset(memory_in, work / "memory-small", n)
    keep = set(stages.split(","))
    disable = [
        f"stages.{s}.enabled=false" for s in load_config(manifest, ["inputs=[.]"]).stages if s not in keep
    ]
    log(f"memory: {n} inputs ({stages})")
    mem_n = run_pipeline_measured(manifest, small, work, "mem-n", disable)
    log(f"memory: {10 * n} inputs")
    mem_10n = run_pipeline_measured(manifest, memory_in, work, "mem-10n", disable)
    return {
        "memory": {"n": mem_n, "10n": mem_10n},
        "rss_10n_over_n": mem_10n["peak_rss_mib"] / mem_n["peak_rss_mib"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # Other work on the machine skews every timing (multi-threaded torch most): recorded for the reader.
    results: dict[str, Any] = {
        "n": args.n, "manifest": args.manifest, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]
    }  # fmt: skip
    results |= throughput(args.manifest, args.n, args.scale_stages, work)
    results |= memory(args.manifest, args.memory_n, args.memory_stages, work)
    log("writer vs disk")
    results["writer"] = writer_vs_disk(work / "writer")
    results["writer_vs_disk"] = results["writer"]["ratio"]
    results["gpu"] = gpu_busy_share(args.manifest, work / "inputs", work)
    efficiency = min(1.0, results["pipeline_vs_ideal"])
    gpu_stages = model_stages(args.manifest)
    busy = results["pipeline"]["stage_busy_s"]
    results["cluster_model"] = {
        f"{g}_gpus_{8 * g}_cpus": predict_throughput(busy, gpu_stages, g, 8 * g, efficiency)
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
