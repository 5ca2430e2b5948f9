"""Engine output -> records and frames at training resolution, read through the foundation only:
the committed index (:mod:`groundmill.shards`) names the shards, and :mod:`groundmill.media` decodes
video frames upright (the record's `media.rotation` applied, so frames and masks agree)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from groundmill.media import video_frames
from groundmill.model.config import SourceConfig
from groundmill.schema import STATUS_OK, decode_mask, upgrade_record
from groundmill.shards import read_index


def shard_urls(source: str | Path) -> list[str]:
    """The committed shards of an engine output dir (rows with status ok and a shard)."""
    table = read_index(source, columns=["shard", "status"]).to_pylist()
    shards = sorted({r["shard"] for r in table if r["status"] == STATUS_OK and r["shard"]})
    if not shards:
        raise FileNotFoundError(f"no committed shards under {source}")
    return [str(Path(source) / s) for s in shards]


def decode_video(data: bytes, rotation: int = 0) -> list[np.ndarray]:
    """Every frame of a video as displayed (clockwise `rotation` applied), RGB uint8."""
    return [np.asarray(im) for _, im in video_frames(data, rotation)]


def load(sample: dict[str, Any], size: int) -> tuple[dict, list[np.ndarray]]:
    """A webdataset sample -> (record, frames resized to size x size); one frame for an image. Records
    of schema v1 are read as v2; newer ones are refused, naming their version."""
    record = upgrade_record(json.loads(sample["json"]))
    data = sample[record["media"]["ext"]]
    if record["media"]["type"] == "video":
        frames = decode_video(data, record["media"].get("rotation", 0))
    else:
        frames = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))]
    frames = [
        f if f.shape[:2] == (size, size) else np.asarray(Image.fromarray(f).resize((size, size)))
        for f in frames
    ]
    return record, frames


def mask_at(rle: dict, size: int) -> np.ndarray:
    m = decode_mask(rle)
    if m.shape != (size, size):
        m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
    return m


def record_texts(record: dict) -> list[str]:
    """Every text a record can contribute to samples (for building the tiny word-level vocabulary)."""
    texts = [r["expression"] for r in record.get("referring_expressions", [])]
    texts += [record[k]["caption"] for k in ("gcg", "dense_caption") if k in record]
    for e in record.get("expressions", []):
        texts += [v for k, v in e.items() if k != "track_id" and isinstance(v, str)]
    return texts


def eval_records(sources: list[SourceConfig], size: int) -> Iterator[tuple[dict, list[np.ndarray]]]:
    """Every sample of the sources once, in shard order, split by node and worker."""
    for source in sources:
        ds = wds.WebDataset(
            shard_urls(source.path),
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
        )
        for sample in ds:
            yield load(sample, size)
