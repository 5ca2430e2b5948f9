"""The GranD-style sequential baseline: each stage runs over the whole input before the next starts,
in one process, handing over through intermediate JSON files on disk.

It uses the same stage classes, models, batch sizes and per-sample failure isolation as the
pipeline (`pipeline.graph.run_stage`), so the two differ only in orchestration. Its per-stage
process time over the whole input is also each stage's *isolated model time*, from which the
benchmark computes the ideal pipeline throughput.

    .venv/bin/python -m groundmill.benchmarks.baseline MANIFEST --input DIR --work DIR [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

from groundmill.media import MediaError
from groundmill.pipeline.config import Config, load_config
from groundmill.pipeline.graph import build_stage, run_stage
from groundmill.pipeline.load import LOAD_STAGE, normalise_input
from groundmill.pipeline.sources import list_inputs, read_uri
from groundmill.schema import STATUS_ERROR, content_key
from groundmill.stages.base import Sample


def _write(path: Path, sample: Sample) -> None:
    row = sample.to_row()  # the pipeline's own row form; bytes as base64 so it is JSON
    row["data"] = base64.b64encode(row["data"]).decode("ascii")
    row["frames"] = [base64.b64encode(f).decode("ascii") for f in row["frames"]]
    path.write_text(json.dumps(row))


def _read(path: Path) -> Sample:
    row = json.loads(path.read_text())
    row["data"] = base64.b64decode(row["data"])
    row["frames"] = [base64.b64decode(f) for f in row["frames"]]
    return Sample.from_row(row)


def load_step(uris: list[str], cfg: Config, out: Path) -> list[str]:
    """Read, key and normalise every input (the pipeline's load code); one JSON file per input."""
    out.mkdir(parents=True, exist_ok=True)
    names, seen = [], set()
    for n, uri in enumerate(uris):
        raw = read_uri(uri, cfg.limits.max_file_mb * 2**20)
        key = content_key(raw)
        if key in seen:  # duplicates are annotated once, as in the pipeline
            continue
        seen.add(key)
        try:
            sample = normalise_input(uri, key, raw, cfg.limits, cfg.video)
        except MediaError as e:
            sample = Sample(uri, key, "", b"", [], {}, status=STATUS_ERROR, error=f"{LOAD_STAGE}: {e}")
        name = f"{n:08d}.json"
        _write(out / name, sample)
        names.append(name)
    return names


def run_baseline(cfg: Config, work: Path) -> dict[str, Any]:
    """Run every enabled stage of `cfg` sequentially; returns total and per-stage seconds."""
    start = time.perf_counter()
    uris = list_inputs(cfg.inputs)
    previous = work / LOAD_STAGE
    names = load_step(uris, cfg, previous)
    stages: dict[str, dict[str, float]] = {
        LOAD_STAGE: {"setup_s": 0.0, "process_s": time.perf_counter() - start}
    }
    for name, stage_cfg in cfg.stages.items():
        if not stage_cfg.enabled:
            continue
        t0 = time.perf_counter()
        stage = build_stage(name, stage_cfg, cfg.run.seed)
        stage.setup()
        setup_s = time.perf_counter() - t0
        process_s = 0.0
        current = work / name
        current.mkdir(parents=True, exist_ok=True)
        batch_size = stage_cfg.resources.batch_size
        for i in range(0, len(names), batch_size):
            batch = [_read(previous / n) for n in names[i : i + batch_size]]
            t1 = time.perf_counter()
            run_stage(stage, name, batch)
            process_s += time.perf_counter() - t1
            for n, sample in zip(names[i : i + batch_size], batch, strict=True):
                _write(current / n, sample)
        stages[name] = {"setup_s": setup_s, "process_s": process_s}
        del stage  # one model in memory at a time, as GranD's per-stage scripts
        previous = current
    samples = [_read(previous / n) for n in names]
    return {
        "inputs": len(uris),
        "ok": sum(s.ok for s in samples),
        "seconds": time.perf_counter() - start,
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest")
    parser.add_argument("--input", required=True)
    parser.add_argument("--work", required=True, help="folder for the intermediate JSON")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.manifest, [f"inputs={json.dumps([args.input])}", *args.overrides])
    result = run_baseline(cfg, Path(args.work))
    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
