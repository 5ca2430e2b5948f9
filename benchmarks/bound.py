"""The true bound of `make bench`: every operator of the pipeline measured alone, in one fresh process,
at the thread count it gets in the pipeline, on the same inputs.

    .venv/bin/python -m groundmill.benchmarks.bound MANIFEST --input DIR --json FILE [--samples K]

Operators are the pipeline's own code: loading (read, content key, normalise: `pipeline.load`), each
graph operator (`pipeline.graph.StageActor` or `stage_task`, Arrow rows in and out as in Ray) and the
shard sink (`pipeline.sink.ShardSink.write`, fsync'ed commits). Per operator: wall and CPU seconds
(this process's user + system time) per sample after one warm-up batch, the set-up time of a fresh
actor (imports and models: what an actor restart costs), its workers and threads. `ideal` then is

    min( min over operators of workers / wall per sample,  cores / sum of CPU-seconds per sample
         [, GPUs / sum of GPU-seconds per sample] )

an upper bound on any schedule of these operators on this machine: no operator runs faster than
its workers allow, and no schedule does more CPU work per second than there are cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

from groundmill.pipeline.config import Config, Segment, load_config, segments


def threads_for(num_cpus: float) -> int:
    """Ray's intra-op thread count for a worker holding `num_cpus` (OMP_NUM_THREADS = max(1, int))."""
    return max(1, int(num_cpus))


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def import_seconds() -> float:
    """Wall seconds a fresh Python process takes to import torch and the pipeline graph: the part of
    an actor's start that precedes building its models (`setup_s`)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, groundmill.pipeline.graph"], check=True)
    return time.perf_counter() - start


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workers(cfg: Config, seg: Segment, cores: float) -> float:
    """How many copies of an operator run at once in the pipeline: its actors, or tasks as cores allow."""
    r = seg.resources
    return float(r.max_actors) if seg.uses_model or r.max_actors > 1 else cores / max(r.num_cpus, 1e-9)


def _timed(fn: Any, items: list[Any], batch: int) -> tuple[list[Any], float, float]:
    """fn over `items` in batches: its outputs, wall and CPU seconds per item."""
    out, wall0, cpu0 = [], time.perf_counter(), cpu_seconds()
    for i in range(0, len(items), batch):
        out.append(fn(items[i : i + batch]))
    n = max(len(items), 1)
    return out, (time.perf_counter() - wall0) / n, (cpu_seconds() - cpu0) / n


def load_rows(cfg: Config, uris: list[str]) -> pa.Table:
    """The load operator's work on each input: read, key, normalise; ROW_SCHEMA rows."""
    from groundmill.pipeline.load import normalise_input
    from groundmill.pipeline.sources import read_uri
    from groundmill.schema import content_key
    from groundmill.stages.base import ROW_SCHEMA

    rows = []
    for uri in uris:
        raw = read_uri(uri, cfg.limits.max_file_mb * 2**20)
        rows.append(normalise_input(uri, content_key(raw), raw, cfg.limits, cfg.video).to_row())
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def measure_operator(cfg: Config, seg: Segment, tables: list[pa.Table]) -> tuple[dict[str, Any], list]:
    """One graph operator alone at its pipeline thread count: set-up, then the batches timed."""
    import torch

    from groundmill.pipeline.graph import StageActor, operator_specs, stage_task

    threads = threads_for(seg.resources.num_cpus)
    torch.set_num_threads(threads)
    specs = operator_specs(seg)
    start = time.perf_counter()
    if seg.uses_model:
        actor = StageActor(specs, cfg.run.seed)
        fn = actor.__call__
    else:
        actor = None
        fn = lambda t: stage_task(t, specs, cfg.run.seed)  # noqa: E731
    setup_s = time.perf_counter() - start
    fn(tables[0])  # warm-up: lazy initialisation is not per-sample cost
    rows = [r for t in tables for r in t.to_pylist()]
    schema = tables[0].schema
    out, wall, cpu = _timed(
        lambda rs: fn(pa.Table.from_pylist(rs, schema=schema)), rows, seg.resources.batch_size
    )
    if actor is not None:
        actor.close()
    r = seg.resources
    return {
        "setup_s": setup_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "gpu_s": wall * r.num_gpus,
        "threads": threads,
    }, out


def measure(cfg: Config, uris: list[str], cores: float, gpus: float, out_dir: Path) -> dict[str, Any]:
    from groundmill.pipeline.sink import ShardSink

    ops: dict[str, dict[str, Any]] = {}
    load_cpus = cfg.load.num_cpus
    load_rows(cfg, uris[:2])  # warm-up (imports, decoders)
    tables, wall, cpu = _timed(lambda u: load_rows(cfg, u), uris, cfg.load.batch_size)
    ops["load"] = {"wall_s": wall, "cpu_s": cpu, "gpu_s": 0.0, "threads": 1, "setup_s": 0.0,
                   "workers": cores / max(load_cpus, 1e-9)}  # fmt: skip
    for seg in segments(cfg):
        figures, tables = measure_operator(cfg, seg, tables)
        ops[seg.name] = figures | {"workers": workers(cfg, seg, cores)}
    sink = ShardSink(str(out_dir), cfg.output.shard_max_samples, cfg.output.shard_max_mb * 2**20, "bound")
    rows = [r for t in tables for r in t.to_pylist()]
    schema = tables[0].schema
    tasks = itertools.count()

    def write(rows: list[dict[str, Any]]) -> None:  # one write task per shard's worth of rows
        sink.write([pa.Table.from_pylist(rows, schema=schema)], SimpleNamespace(task_idx=next(tasks)))

    _, wall, cpu = _timed(write, rows, cfg.output.shard_max_samples)
    # Write tasks reserve load.num_cpus (pipeline/run.py), so as many run at once as load tasks.
    ops["sink"] = {"wall_s": wall, "cpu_s": cpu, "gpu_s": 0.0, "threads": 1, "setup_s": 0.0,
                   "workers": cores / max(load_cpus, 1e-9)}  # fmt: skip
    return {"operators": ops, "samples": len(uris), "cores": cores, "gpus": gpus} | ideal(ops, cores, gpus)


def ideal(ops: dict[str, dict[str, Any]], cores: float, gpus: float) -> dict[str, Any]:
    """The bound and what binds it: each operator's workers / wall, the cores / CPU work, the GPUs /
    GPU work."""
    limits = {
        f"operator {name}": op["workers"] / op["wall_s"] for name, op in ops.items() if op["wall_s"] > 0
    }
    limits["cpu"] = cores / sum(op["cpu_s"] for op in ops.values())
    gpu_work = sum(op["gpu_s"] for op in ops.values())
    if gpus and gpu_work:
        limits["gpu"] = gpus / gpu_work
    binding = min(limits, key=limits.get)
    return {"ideal_samples_per_s": limits[binding], "bound_by": binding, "limits": limits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest")
    parser.add_argument("--input", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--output", required=True, help="where the sink's shards go")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--cores", type=float, help="the pipeline's CPUs (default: ray.num_cpus)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.manifest, [f"inputs={json.dumps([args.input])}", *args.overrides])
    cores = args.cores or cfg.ray.num_cpus or os.cpu_count() or 1
    uris = sorted(str(p) for p in Path(args.input).iterdir())[: args.samples]
    result = measure(cfg, uris, float(cores), visible_gpus(), Path(args.output))
    result["import_s"] = import_seconds()
    Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
