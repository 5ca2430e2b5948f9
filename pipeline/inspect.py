"""`groundmill inspect OUT_DIR`: what a run wrote, read back from the index and the shard files."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from groundmill.pipeline.run import RUN_RECORD
from groundmill.schema import STATUS_ERROR, STATUS_OK
from groundmill.shards import SHARDS_DIR, read_index


def error_reason(error: str) -> str:
    """The class of an error message: its first two `: `-separated parts ("load: empty file")."""
    return ": ".join(error.split(": ")[:2])


def summarize(out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not an output directory")
    index = read_index(out).to_pylist()
    samples = [r for r in index if r["status"] == STATUS_OK and r["shard"]]
    errors = Counter(error_reason(r["error"] or "") for r in index if r["status"] == STATUS_ERROR)
    stage_count: Counter[str] = Counter()
    stage_seconds: defaultdict[str, float] = defaultdict(float)
    for r in index:
        for stage, seconds in r["timings"] or []:
            stage_count[stage] += 1
            stage_seconds[stage] += seconds
    record = json.loads((out / RUN_RECORD).read_text()) if (out / RUN_RECORD).exists() else {}
    return {
        "out_dir": str(out),
        "status": record.get("status", "unknown"),
        "inputs": len(index),
        "samples": len(samples),
        "duplicates": sum(1 for r in index if r["duplicate_of"]),
        "errors": sum(errors.values()),
        "errors_by_reason": dict(errors.most_common()),
        "media_types": dict(Counter(r["media_type"] for r in samples)),
        "objects": sum(r["num_objects"] or 0 for r in samples),
        "shards": len(list((out / SHARDS_DIR).glob("*.tar"))),
        "shard_bytes": sum(p.stat().st_size for p in (out / SHARDS_DIR).glob("*.tar")),
        "stages": {
            s: {
                "samples": stage_count[s],
                "seconds": round(stage_seconds[s], 3),
                "seconds_per_sample": round(stage_seconds[s] / stage_count[s], 4),
            }
            for s in stage_count
        },  # fmt: skip
        "random_weight_models": record.get("random_weight_models", []),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['out_dir']}: run {summary['status']}",
        f"  inputs {summary['inputs']}  samples {summary['samples']}  duplicates {summary['duplicates']}  "
        f"errors {summary['errors']}  objects {summary['objects']}",
        f"  shards {summary['shards']} ({summary['shard_bytes'] / 2**20:.1f} MiB)  media {summary['media_types']}",
    ]
    if summary["errors_by_reason"]:
        lines.append("  errors by reason:")
        lines += [f"    {n:6d}  {reason}" for reason, n in summary["errors_by_reason"].items()]
    if summary["stages"]:
        width = max(len(name) for name in summary["stages"])
        lines.append(f"    {'stage':{width}s} {'samples':>7s} {'seconds':>9s} {'s/sample':>10s}")
        for name, s in summary["stages"].items():
            lines.append(
                f"    {name:{width}s} {s['samples']:7d} {s['seconds']:9.2f} {s['seconds_per_sample']:10.4f}"
            )
    if summary["random_weight_models"]:
        lines.append(
            f"  RANDOM-WEIGHT models (annotations not real): {', '.join(summary['random_weight_models'])}"
        )
    return "\n".join(lines)
