"""`groundmill inspect OUT_DIR`: what a run wrote, read back from the index and the shard files: the
index's rows, errors and stage timings, and what the records hold (objects, masks, GCG phrases,
referring expressions, tracks, verification, LLM drops), counted in one streaming pass over the shards."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from groundmill.pipeline.export.common import iter_samples
from groundmill.pipeline.run import RUN_RECORD
from groundmill.schema import (
    DUPLICATE_ERROR_PREFIX,
    STATUS_ERROR,
    STATUS_OK,
    Record,
    frame_records,
    mask_area,
)
from groundmill.shards import SHARDS_DIR, read_index


def error_reason(error: str) -> str:
    """The class of an error message: its first two `: `-separated parts ("load: empty file"); a
    duplicate of a failed input is classed by the original's reason."""
    if error.startswith(DUPLICATE_ERROR_PREFIX):
        return "duplicate of a failed input: " + error_reason(error.split(": ", 1)[-1])
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
        for t in r["timings"] or []:
            stage_count[t["stage"]] += 1
            stage_seconds[t["stage"]] += t["seconds"]
    record = json.loads((out / RUN_RECORD).read_text()) if (out / RUN_RECORD).exists() else {}
    return {
        "out_dir": str(out),
        "status": record.get("status", "unknown"),
        "inputs": len(index),
        "samples": len(samples),
        "duplicates": sum(1 for r in index if r["duplicate_of"]),
        "errors": sum(errors.values()),
        "errors_by_reason": dict(errors.most_common()),
        "errors_by_stage": dict(
            Counter(r["error_stage"] or "unknown" for r in index if r["status"] == STATUS_ERROR)
        ),
        "media_types": dict(Counter(r["media_type"] for r in samples)),
        "objects": sum(r["num_objects"] or 0 for r in samples),
        "records": record_contents(out, index),
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


def _count_frame(c: Counter[str], frame: dict[str, Any], hallucination: list[float]) -> None:
    for group in ("objects", "floating_objects"):
        c[group] += len(frame.get(group, []))
        c["masks"] += sum(1 for o in frame.get(group, []) if "segmentation" in o)
    c["floating_attributes"] += len(frame.get("floating_attributes", []))
    c["stuff_regions"] += len(frame.get("stuff", []))
    c["sam2_auto_objects"] += sum(
        o.get("segmentation_source") == "SAM2-auto" for o in frame.get("floating_objects", [])
    )
    c["referring_expressions"] += len(frame.get("referring_expressions", []))
    verification = frame.get("dense_caption", {}).get("verification")
    if verification:
        c["captions_verified"] += 1
        c["captions_accepted"] += verification["accepted"]
        hallucination.append(verification["hallucination_rate"])


def _count_record(c: Counter[str], drops: Counter[str], record: Record, hallucination: list[float]) -> None:
    for frame in frame_records(record):
        _count_frame(c, frame, hallucination)
        drops.update(d["stage"] for d in frame.get("llm_drops", []))
    if record["media"]["type"] == "video":
        drops.update(d["stage"] for d in record.get("llm_drops", []))
    gcg = record.get("gcg")
    c["gcg_records"] += gcg is not None
    c["gcg_phrases"] += len(gcg["groundings"]) if gcg else 0
    c["tracks"] += len(record.get("tracks", []))
    c["sampled_frames"] += len(record.get("frame_times", []))
    c["masklet_frames"] += sum(
        1 for t in record.get("tracks", []) for m in t["masklet"] if mask_area(m["segmentation"]) > 0
    )
    c["video_expressions"] += len(record.get("expressions", []))


def record_contents(out: Path, index: list[dict[str, Any]]) -> dict[str, Any]:
    """What the committed records hold, counted sample by sample (v1 records read as v2)."""
    c: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    hallucination: list[float] = []
    for s in iter_samples(out, progress=False):
        _count_record(c, drops, s.record, hallucination)
    ambiguous = sum(x["value"] for r in index for x in r["stats"] or [] if x["name"] == "refexp.ambiguous")
    return {
        **{k: c[k] for k in ("objects", "floating_objects", "masks", "floating_attributes", "gcg_records",
                             "gcg_phrases", "referring_expressions", "tracks", "sampled_frames", "masklet_frames",
                             "video_expressions", "captions_verified", "captions_accepted", "stuff_regions",
                             "sam2_auto_objects")},
        "objects_without_unique_expression": int(ambiguous),
        "hallucination_rate": round(sum(hallucination) / len(hallucination), 4) if hallucination else None,
        "llm_drops": dict(drops.most_common()),
    }  # fmt: skip


def _format_contents(r: dict[str, Any]) -> list[str]:
    rate = "n/a" if r["hallucination_rate"] is None else f"{r['hallucination_rate']:.2f}"
    drops = ", ".join(f"{stage} {n}" for stage, n in r["llm_drops"].items()) or "none"
    return [
        f"  records: objects {r['objects']}  floating objects {r['floating_objects']}  masks {r['masks']}  "
        f"floating attributes {r['floating_attributes']}  stuff regions {r['stuff_regions']}  "
        f"SAM2-auto objects {r['sam2_auto_objects']}",
        f"    GCG {r['gcg_records']} images, {r['gcg_phrases']} phrases  referring expressions "
        f"{r['referring_expressions']} unique ({r['objects_without_unique_expression']} objects had none)",
        f"    tracks {r['tracks']}, masks on {r['masklet_frames']} of their frames ({r['sampled_frames']} "
        f"frames sampled)  video expressions {r['video_expressions']}",
        f"    verification: {r['captions_accepted']} of {r['captions_verified']} dense captions accepted, "
        f"hallucination rate {rate}  LLM drops: {drops}",
    ]


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['out_dir']}: run {summary['status']}",
        f"  inputs {summary['inputs']}  samples {summary['samples']}  duplicates {summary['duplicates']}  "
        f"errors {summary['errors']}  objects {summary['objects']}",
        f"  shards {summary['shards']} ({summary['shard_bytes'] / 2**20:.1f} MiB)  media {summary['media_types']}",
        *_format_contents(summary["records"]),
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
