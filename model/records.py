"""Engine output -> records and frames at training resolution, read through the foundation only:
the committed index (:mod:`groundmill.shards`) names the shards, and :mod:`groundmill.media` decodes
video frames upright (the record's `media.rotation` applied, so frames and masks agree)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from groundmill.media import video_frames
from groundmill.model.config import SourceConfig
from groundmill.schema import STATUS_OK, decode_mask, upgrade_record
from groundmill.shards import read_index


def safe_shard_path(source: str | Path, shard: str) -> str:
    """The file an index's `shard` names, as an absolute local path inside `source`.

    The index is data, so its paths are untrusted: webdataset would run a `pipe:` URL through a
    shell, and an absolute or `..` path would read outside the output. Only a relative, scheme-free
    path without `..` that resolves inside `source` is accepted; the absolute path returned has no
    scheme, so webdataset opens it as a plain file."""
    root = Path(source).resolve()
    parts = PurePosixPath(shard).parts
    if ":" in shard or "\\" in shard or shard.startswith("/") or ".." in parts or not parts:
        raise ValueError(
            f"{source}: index names an unsafe shard path {shard!r} (must be relative, in the output)"
        )
    path = (root / shard).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{source}: shard {shard!r} resolves outside the output ({path})")
    return str(path)


def shard_urls(source: str | Path) -> list[str]:
    """The committed shards of an engine output dir (rows with status ok and a shard), as safe paths."""
    table = read_index(source, columns=["shard", "status"]).to_pylist()
    shards = sorted({r["shard"] for r in table if r["status"] == STATUS_OK and r["shard"]})
    if not shards:
        raise FileNotFoundError(f"no committed shards under {source}")
    return [safe_shard_path(source, s) for s in shards]


def decode_video(data: bytes, rotation: int = 0, indices: set[int] | None = None) -> list[np.ndarray | None]:
    """The frames of a video as displayed (clockwise `rotation` applied), RGB uint8, by frame index:
    all of them, or only `indices` (the others are None, so memory holds only what is used)."""
    frames: list[np.ndarray | None] = []
    for index, im in video_frames(data, rotation, indices):
        frames += [None] * (index - len(frames))
        frames.append(np.asarray(im))
    return frames


def annotated_frames(record: dict) -> set[int]:
    """The frame indices a video record annotates (keyframes and track masklets): what tasks sample."""
    indices = {m["frame_index"] for t in record.get("tracks", []) for m in t.get("masklet", [])}
    return indices | {f["frame_index"] for f in record.get("keyframes", [])} | {0}


def load(sample: dict[str, Any], size: int) -> tuple[dict, list[np.ndarray]]:
    """A webdataset sample -> (record, frames resized to size x size); one frame for an image. Records
    of schema v1 are read as v2; newer ones are refused, naming their version."""
    record = upgrade_record(json.loads(sample["json"]))
    data = sample[record["media"]["ext"]]
    if record["media"]["type"] == "video":
        frames = decode_video(data, record["media"].get("rotation", 0), annotated_frames(record))
    else:
        frames = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))]
    frames = [
        f if f is None or f.shape[:2] == (size, size) else np.asarray(Image.fromarray(f).resize((size, size)))
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
