"""The shard writer's MB/s against a raw sequential write + fsync on the same disk."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np


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
