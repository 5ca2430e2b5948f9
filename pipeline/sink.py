"""The Ray Data sink: each write task's rows become WebDataset shards plus index parts, committed
atomically through :mod:`groundmill.shards` (the on-disk format)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from groundmill.schema import STATUS_ERROR, STATUS_OK, frame_records
from groundmill.shards import ShardWriter, read_index
from groundmill.stages.base import STATUS_DUPLICATE, Sample


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
        "error": sample.error or None,
        "duplicate_of": sample.duplicate_of,
        "num_objects": num_objects if status == STATUS_OK and media else None,
        "timings": sample.timings,
        "stats": sample.stats,
    }


class ShardSink(Datasink):
    """Writes each write task's rows as WebDataset shards + index parts (see groundmill.shards)."""

    def __init__(self, out_dir: str, max_samples: int, max_bytes: int, prefix: str):
        self.out_dir = out_dir
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.prefix = prefix

    @property
    def min_rows_per_write(self) -> int:
        return self.max_samples

    def _writer(self, task: str) -> ShardWriter:
        return ShardWriter(self.out_dir, name=f"{task}-{uuid.uuid4().hex[:12]}")

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, int]:
        """One write task's rows -> shards named `{prefix}-{task index}-{random}`. A retry of the task
        (same index) first reads what its earlier attempts committed and skips those inputs, so a
        retried task never writes a row twice."""
        task = f"{self.prefix}-{ctx.task_idx:05d}"
        done = set(read_index(self.out_dir, ["uri"], parts=f"{task}-*").column("uri").to_pylist())
        writer = self._writer(task)
        counts = {"samples": 0, "rows": 0, "shards": 0}
        try:
            for block in blocks:
                for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                    sample = Sample.from_row(row)
                    if sample.uri in done:
                        continue
                    if sample.status == STATUS_OK:
                        ext = sample.record["media"]["ext"]
                        writer.add_sample(sample.key, sample.data, ext, sample.record, index_row(sample))
                        counts["samples"] += 1
                    else:
                        writer.add_row(index_row(sample))
                    counts["rows"] += 1
                    if writer.num_samples >= self.max_samples or writer.nbytes >= self.max_bytes:
                        writer.commit()
                        counts["shards"] += 1
                        writer = self._writer(task)
            if len(writer):
                writer.commit()
                counts["shards"] += 1
        except BaseException:
            writer.discard()  # Ray retries the task; its inputs are not in the index yet
            raise
        return counts
