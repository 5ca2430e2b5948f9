"""The Ray Data sink: each write task's rows become WebDataset shards plus index parts, committed
atomically through :mod:`groundmill.shards` (the on-disk format).

Shards are uniform, as Hugging Face `datasets`' webdataset builder and Ray's `read_webdataset` need:
one writer per media kind, so a shard holds one media extension (images all in the run's
`output.image_format`, each video container in shards of its own) and every sample the same two
members, `{key}.{ext}` and `{key}.json`. Shard names say the kind: `<run>-<attempt>-image-jpg-<id>.tar`.
Rows without a sample (errors, duplicates) go to an index part of their own, `<run>-<attempt>-rows-<id>`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from groundmill.schema import (
    DUPLICATE_ERROR_PREFIX,
    ERROR_CODE_UNCLASSIFIED,
    STATUS_ERROR,
    STATUS_OK,
    annotate_coverage,
    frame_records,
)
from groundmill.shards import (
    INDEX_DIR,
    ShardWriter,
    index_table,
    read_index,
    read_index_part,
    rewrite_index_part,
)
from groundmill.stages.base import STATUS_DUPLICATE, Sample

ERROR_CODE_CODED = re.compile(r"\[([a-z_]+)\] ")


def error_fields(sample: Sample) -> dict[str, str | None]:
    """error, error_stage (the `stage: reason` prefix) and error_code of an error sample."""
    if sample.status != STATUS_ERROR or not sample.error:
        return {"error": sample.error or None, "error_stage": None, "error_code": None}
    stage, sep, reason = sample.error.partition(": ")
    code = ERROR_CODE_CODED.match(reason if sep else sample.error)  # `[code] reason` (schema.error_reason)
    return {
        "error": sample.error,
        "error_stage": stage if sep else None,
        "error_code": code.group(1) if code else ERROR_CODE_UNCLASSIFIED,
    }


def index_row(sample: Sample) -> dict[str, Any]:
    record = sample.record
    media = record.get("media", {})
    status = STATUS_OK if sample.status in (STATUS_OK, STATUS_DUPLICATE) else STATUS_ERROR
    num_objects = sum(len(f.get("objects", [])) for f in frame_records(record)) if media else 0
    return {
        "key": sample.key,
        "uri": sample.uri,
        "media_type": sample.media_type or None,
        "bytes": record.get("source", {}).get("bytes"),
        "width": media.get("width"),
        "height": media.get("height"),
        "status": status,
        **error_fields(sample),
        "duplicate_of": sample.duplicate_of,
        "num_objects": num_objects if status == STATUS_OK and media else None,
        "coverage": record.get("coverage") if status == STATUS_OK and media else None,
        "timings": sample.timings,
        "stats": sample.stats,
    }


class ShardSink(Datasink):
    """Writes each write task's rows as uniform WebDataset shards + index parts (see groundmill.shards)."""

    def __init__(self, out_dir: str, max_samples: int, max_bytes: int, prefix: str):
        self.out_dir = out_dir
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.prefix = prefix

    @property
    def min_rows_per_write(self) -> int:
        return self.max_samples

    def _writer(self, task: str, kind: str) -> ShardWriter:
        return ShardWriter(self.out_dir, name=f"{task}-{kind}-{uuid.uuid4().hex[:12]}")

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, int]:
        """One write task's rows -> shards named `{prefix}-{task index}-{kind}-{random}`, one media kind
        per shard. A retry of the task (same index) first reads what its earlier attempts committed and
        skips those inputs, so a retried task never writes a row twice."""
        task = f"{self.prefix}-{ctx.task_idx:05d}"
        done = set(read_index(self.out_dir, ["uri"], parts=f"{task}-*").column("uri").to_pylist())
        writers: dict[str, ShardWriter] = {}  # kind ("image-jpg", "video-mp4", "rows") -> open writer
        counts = {"samples": 0, "rows": 0, "shards": 0}
        try:
            for block in blocks:
                for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                    sample = Sample.from_row(row)
                    if sample.uri in done:
                        continue
                    if sample.status == STATUS_OK:
                        annotate_coverage(sample.record)  # from the final objects and stuff
                        ext = sample.record["media"]["ext"]
                        kind = f"{sample.media_type}-{ext}"
                        writer = writers[kind] = writers.get(kind) or self._writer(task, kind)
                        writer.add_sample(sample.key, sample.data, ext, sample.record, index_row(sample))
                        counts["samples"] += 1
                        full = writer.num_samples >= self.max_samples or writer.nbytes >= self.max_bytes
                    else:
                        kind = "rows"
                        writer = writers[kind] = writers.get(kind) or self._writer(task, kind)
                        writer.add_row(index_row(sample))
                        full = len(writer) >= self.max_samples
                    counts["rows"] += 1
                    if full:
                        writers.pop(kind).commit()
                        counts["shards"] += 1
            for writer in writers.values():
                writer.commit()
                counts["shards"] += 1
        except BaseException:
            for writer in writers.values():
                writer.discard()  # Ray retries the task; its inputs are not in the index yet
            raise
        return counts


def settle_duplicates(out_dir: str | Path) -> int:
    """Duplicates of inputs that failed become error rows carrying the original's reason
    (`duplicate of <uri>: <reason>`): nothing of them is in the shards. Rewrites only the index parts
    that hold such rows (each atomically); returns how many rows changed. Idempotent, so a rerun
    settles what a killed run left."""
    parts = sorted((Path(out_dir) / INDEX_DIR).glob("*.parquet"))
    failed: dict[str, dict[str, Any]] = {}
    tables = {}
    for part in parts:
        table = read_index_part(part)
        tables[part] = table
        for r in table.filter(pc.equal(table["status"], STATUS_ERROR)).to_pylist():
            if not r["duplicate_of"]:
                failed[r["uri"]] = r
    changed = 0
    for part, table in tables.items():
        if not pc.any(pc.is_valid(table["duplicate_of"])).as_py():
            continue
        rows = table.to_pylist()
        hits = [r for r in rows if r["duplicate_of"] in failed and r["status"] == STATUS_OK]
        for r in hits:
            original = failed[r["duplicate_of"]]
            r.update(status=STATUS_ERROR, error=f"{DUPLICATE_ERROR_PREFIX}{original['uri']}: {original['error']}",
                     error_stage=original["error_stage"], error_code=original["error_code"], num_objects=None)  # fmt: skip
        if hits:
            rewrite_index_part(part, index_table(rows))
            changed += len(hits)
    return changed
