"""The sink: CPU time per sample on realistic records, and the shard writer's MB/s against a raw
sequential write on the same disk, both with fsync.

- `sink_cpu_ms_per_sample`: `pipeline.sink.ShardSink.write` (Arrow rows -> samples -> tar members,
  index rows, Parquet part, fsync'ed atomic commits) on 640x480 JPEGs whose records hold 20-50
  objects, each with an RLE mask (`schema.encode_mask`), a box, a label and attributes: the size of a
  GranD level-1 record. CPU = this process's user + system time.
- `writer_vs_disk`: ShardWriter MB/s over raw `write` + fsync of the same bytes, per repeat
  (interleaved, so other load on the machine hits both alike); median, min and max of the ratio.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from groundmill.benchmarks.bound import cpu_seconds
from groundmill.benchmarks.measure import photos, random_crop


def _photo_jpeg(rng: np.random.Generator) -> bytes:
    """A 640x480 crop of a real photo (scikit-image's astronaut), JPEG q90."""
    buf = io.BytesIO()
    random_crop(photos()[0], rng, (640, 480)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def masked_record(key: str, rng: np.random.Generator, objects: int, h: int = 480, w: int = 640) -> dict:
    """A record with `objects` objects, each an elliptical mask in its box, RLE-encoded."""
    from groundmill.schema import encode_mask

    yy, xx = np.mgrid[:h, :w]
    objs = []
    for i in range(objects):
        bw, bh = int(rng.integers(20, w // 2)), int(rng.integers(20, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        cx, cy = x0 + bw / 2, y0 + bh / 2
        mask = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
        objs.append({"id": i, "bbox": [x0, y0, x0 + bw, y0 + bh], "labels": [{"label": f"thing {i}", "score": 0.5}],
                     "attributes": ["red", "small"], "segmentation": encode_mask(mask), "score": 0.5})  # fmt: skip
    return {"key": key, "media": {"type": "image", "ext": "jpg", "width": w, "height": h}, "objects": objs}


def sink_cpu_per_sample(folder: Path, samples: int = 96, rows_per_task: int = 32) -> dict[str, Any]:
    """CPU and wall ms per sample of ShardSink.write on records with 20-50 masks."""
    import pyarrow as pa

    from groundmill.pipeline.sink import ShardSink
    from groundmill.schema import content_key
    from groundmill.stages.base import ROW_SCHEMA, Sample

    rng = np.random.default_rng(0)
    rows, masks = [], []
    for i in range(samples):
        jpeg, n = _photo_jpeg(rng), int(rng.integers(20, 51))
        key = content_key(jpeg + i.to_bytes(4, "little"))
        rows.append(Sample(f"img{i}.jpg", key, "image", jpeg, [], masked_record(key, rng, n)).to_row())
        masks.append(n)
    blocks = [
        pa.Table.from_pylist(rows[i : i + rows_per_task], schema=ROW_SCHEMA)
        for i in range(0, samples, rows_per_task)
    ]
    sink = ShardSink(str(folder), max_samples=rows_per_task, max_bytes=2**30, prefix="sink")
    sink.write([blocks[0]], SimpleNamespace(task_idx=0))  # warm-up: imports, first Parquet write
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    for n, block in enumerate(blocks[1:], start=1):
        sink.write([block], SimpleNamespace(task_idx=n))
    timed = samples - rows_per_task
    result = {"cpu_ms_per_sample": (cpu_seconds() - cpu0) / timed * 1e3,
              "wall_ms_per_sample": (time.perf_counter() - wall0) / timed * 1e3,
              "masks_per_sample": [min(masks), max(masks)], "samples": timed,
              "record_kb": float(np.mean([len(r["record"]) for r in rows])) / 1024}  # fmt: skip
    shutil.rmtree(folder)
    return result


def _write_shards(folder: Path, payload: bytes, n: int, shard_mb: int) -> tuple[int, float]:
    """`n` samples through ShardWriter (tar streamed to a temp file, fsync'ed atomic commit)."""
    from groundmill.schema import content_key
    from groundmill.shards import ShardWriter

    start = time.perf_counter()
    writer, written = ShardWriter(folder), 0
    for i in range(n):
        key = content_key(i.to_bytes(8, "little"))
        record = {"key": key, "media": {"type": "image", "ext": "jpg", "width": 640, "height": 480}}
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
    """The same payloads written sequentially, one file per shard's worth, each fsynced."""
    start = time.perf_counter()
    per_file = max(1, shard_mb * 2**20 // len(payload))
    for f_n in range(0, n, per_file):
        with open(path.with_name(f"{path.name}.{f_n}"), "wb", buffering=0) as f:
            for _ in range(min(per_file, n - f_n)):
                f.write(payload)
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    for p in path.parent.glob(f"{path.name}.*"):
        p.unlink()
    return n * len(payload), seconds


def writer_vs_disk(folder: Path, total_mb: int = 128, shard_mb: int = 32, repeats: int = 5) -> dict[str, Any]:
    """ShardWriter vs raw write + fsync, interleaved `repeats` times on the same disk."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = (
        np.random.default_rng(0).integers(0, 256, 256 * 1024, dtype=np.uint8).tobytes()
    )  # a 256 KiB image
    n = total_mb * 4
    _write_shards(folder / "warm-up", payload, 1, shard_mb)  # one-time imports are not write speed
    writer, disk = [], []
    for _ in range(repeats):
        nbytes, seconds = _write_shards(folder / "shards", payload, n, shard_mb)
        writer.append(nbytes / 2**20 / seconds)
        nbytes, seconds = _write_raw(folder / "raw.bin", payload, n, shard_mb)
        disk.append(nbytes / 2**20 / seconds)
    ratios = [w / d for w, d in zip(writer, disk, strict=True)]
    return {"writer_mb_per_s": statistics.median(writer), "disk_mb_per_s": statistics.median(disk),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "repeats": repeats}  # fmt: skip
