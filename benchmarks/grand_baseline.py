"""The GranD-faithful baseline: each stage a separate data-parallel pass over the whole input, as
GranD's per-model scripts ran (GLaMM's GranD pipeline: one script per model, run over the image
folder, each reading the images and the previous models' per-image JSON and writing its own).

- Every pass starts P fresh processes, P = the workers the stage's operator has in the pipeline,
  each with that operator's thread count and the stage's batch size, on every P-th input.
- Between passes: one JSON file of annotations per image; the normalised images are files written
  once by the load pass (GranD's image folder), not re-encoded into the JSON.
- At the end a pass of P processes writes the WebDataset shards and index (`pipeline.sink.ShardSink`).

    .venv/bin/python -m groundmill.benchmarks.grand_baseline MANIFEST --input DIR --work DIR --json FILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from groundmill.benchmarks.bound import threads_for
from groundmill.pipeline.config import Config, load_config, segments
from groundmill.stages.base import Sample

LOAD, WRITE = "load", "write"


def passes(cfg: Config) -> list[tuple[str, int, int]]:
    """(pass, processes, threads): loading, then every enabled stage in order, then writing."""
    out = [(LOAD, 0, 1)]
    for seg in segments(cfg):
        for name in seg.stages:
            out.append((name, seg.resources.max_actors, threads_for(seg.resources.num_cpus)))
    workers = max(p for _, p, _ in out)
    return [(LOAD, workers, 1), *out[1:], (WRITE, workers, 1)]


def _save(folder: Path, n: int, sample: Sample, with_image: bool) -> None:
    row = sample.to_row()
    if with_image:
        (folder.parent / "images" / f"{n:08d}.bin").write_bytes(row["data"])
    row["data"], row["frames"] = b"", []
    (folder / f"{n:08d}.json").write_text(
        json.dumps({k: v for k, v in row.items() if not isinstance(v, bytes)})
    )


def _open(folder: Path, n: int) -> Sample:
    row = json.loads((folder / f"{n:08d}.json").read_text())
    row["data"], row["frames"] = (folder.parent / "images" / f"{n:08d}.bin").read_bytes(), []
    return Sample.from_row(row)


def run_pass(cfg: Config, name: str, previous: str, part: int, parts: int, work: Path) -> None:
    """One process of one pass: its share of the inputs (every `parts`-th, from `part`)."""
    uris = sorted(str(p) for p in Path(cfg.inputs[0]).iterdir())
    mine = list(range(part, len(uris), parts))
    folder = work / name
    if name == LOAD:
        from groundmill.pipeline.load import normalise_input
        from groundmill.pipeline.sources import read_uri
        from groundmill.schema import content_key

        for n in mine:
            raw = read_uri(uris[n], cfg.limits.max_file_mb * 2**20)
            _save(folder, n, normalise_input(uris[n], content_key(raw), raw, cfg.limits, cfg.video), True)
        return
    samples = [_open(work / previous, n) for n in mine]
    if name == WRITE:
        import pyarrow as pa

        from groundmill.pipeline.sink import ShardSink
        from groundmill.stages.base import ROW_SCHEMA

        sink = ShardSink(
            str(work / "out"), cfg.output.shard_max_samples, cfg.output.shard_max_mb * 2**20, "grand"
        )
        rows = [s.to_row() for s in samples]
        sink.write([pa.Table.from_pylist(rows, schema=ROW_SCHEMA)], SimpleNamespace(task_idx=part))
        return
    from groundmill.pipeline.graph import build_stage, run_stage

    stage_cfg = cfg.stages[name]
    stage = build_stage(name, stage_cfg, cfg.run.seed)
    stage.setup()
    size = stage_cfg.resources.batch_size
    for i in range(0, len(samples), size):
        run_stage(stage, name, samples[i : i + size])
    stage.teardown()
    for n, sample in zip(mine, samples, strict=True):
        _save(folder, n, sample, False)


def run_grand(manifest: str, inputs: Path, work: Path) -> dict[str, Any]:
    """Every pass in turn, each as P parallel fresh processes; the passes' and the total wall seconds."""
    cfg = load_config(manifest, [f"inputs={json.dumps([str(inputs)])}"])
    (work / "images").mkdir(parents=True)
    start, seconds, previous = time.perf_counter(), {}, ""
    for name, parts, threads in passes(cfg):
        (work / name).mkdir()
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "groundmill.benchmarks.grand_baseline",
                    manifest,
                    "--input",
                    str(inputs),
                    "--work",
                    str(work),
                    "--pass",
                    name,
                    "--previous",
                    previous,
                    "--part",
                    str(i),
                    "--parts",
                    str(parts),
                ],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(parts)
        ]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"GranD baseline pass {name} failed:\n{err[-3000:]}")
        seconds[name] = time.perf_counter() - t0
        previous = name
    from groundmill.shards import read_index

    status = read_index(work / "out", columns=["status"]).column("status").to_pylist()
    return {"seconds": time.perf_counter() - start, "passes": seconds, "inputs": len(status),
            "ok": status.count("ok")}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest")
    parser.add_argument("--input", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--json", help="the orchestrator: run every pass, write the result here")
    parser.add_argument("--pass", dest="pass_name", help="one process of one pass (internal)")
    parser.add_argument("--previous", default="")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.pass_name:
        cfg = load_config(args.manifest, [f"inputs={json.dumps([args.input])}"])
        if args.pass_name not in (LOAD, WRITE):
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        run_pass(cfg, args.pass_name, args.previous, args.part, args.parts, Path(args.work))
        return
    result = run_grand(args.manifest, Path(args.input), Path(args.work))
    Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
