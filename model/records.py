"""Engine output -> records and frames at training resolution, read through the foundation only:
the committed index (:mod:`groundmill.shards`) names the shards, and :mod:`groundmill.media` decodes
video frames upright (the record's `media.rotation` applied, so frames and masks agree)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from groundmill.media import video_frames
from groundmill.model.config import SourceConfig
from groundmill.schema import STATUS_OK, decode_mask, upgrade_record
from groundmill.shards import read_index, safe_members


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


class ShardReader:
    """Random access to one shard's samples by key: the tar's headers are read once, a sample's files are
    read by offset when asked for (so a shard is never held in memory)."""

    def __init__(self, url: str):
        self.tar = tarfile.open(url, "r")  # noqa: SIM115 (open while cached; ShardCache closes it)
        self.members: dict[str, list[tarfile.TarInfo]] = {}
        for member in safe_members(self.tar):
            self.members.setdefault(Path(member.name).name.partition(".")[0], []).append(member)
        self.keys = sorted(self.members)

    def sample(self, key: str) -> dict[str, Any]:
        files = {
            Path(m.name).name.partition(".")[2]: self.tar.extractfile(m).read() for m in self.members[key]
        }
        return {"__key__": key, **files}


class ShardCache:
    """The few most recently used ShardReaders (open tar files), closed when evicted."""

    def __init__(self, size: int = 4):
        self.size, self.readers = size, OrderedDict()

    def __call__(self, url: str) -> ShardReader:
        if url not in self.readers:
            self.readers[url] = ShardReader(url)
            if len(self.readers) > self.size:
                self.readers.popitem(last=False)[1].tar.close()
        self.readers.move_to_end(url)
        return self.readers[url]


def decode_video(data: bytes, rotation: int = 0) -> list[np.ndarray]:
    """Every frame of a video as displayed (clockwise `rotation` applied), RGB uint8."""
    return [np.asarray(im) for _, im in video_frames(data, rotation)]


def resized(im: Image.Image, size: int) -> np.ndarray:
    return np.asarray(im if im.size == (size, size) else im.resize((size, size)))


class Clip:
    """A video's frames at training resolution, decoded when asked for and only those asked for: each
    decoded frame is resized at once, so a clip of any length holds size x size frames only."""

    def __init__(self, data: bytes, rotation: int, size: int, length: int | None):
        self.data, self.rotation, self.size = data, rotation, size
        self.length = length if length else sum(1 for _ in video_frames(data, rotation))

    def __len__(self) -> int:
        return self.length

    def take(self, indices: list[int]) -> list[np.ndarray]:
        """The frames at `indices` (repeats allowed), in that order; one decoding pass."""
        decoded = {
            i: resized(im, self.size) for i, im in video_frames(self.data, self.rotation, set(indices))
        }
        return [decoded[i] for i in indices]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.take([index])[0]


def load(sample: dict[str, Any], size: int) -> tuple[dict, list[np.ndarray] | Clip]:
    """A webdataset sample -> (record, frames at size x size): one frame for an image, a Clip for a video.
    Records of schema v1 are read as v2; newer ones are refused, naming their version."""
    record = upgrade_record(json.loads(sample["json"]))
    data = sample[record["media"]["ext"]]
    if record["media"]["type"] == "video":
        media = record["media"]
        return record, Clip(data, media.get("rotation", 0), size, media.get("num_frames"))
    return record, [resized(Image.open(io.BytesIO(data)).convert("RGB"), size)]


def mask_at(rle: dict, size: int) -> np.ndarray:
    m = decode_mask(rle)
    if m.shape != (size, size):
        m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
    return m


def record_texts(record: dict) -> list[str]:
    """Every text a record can contribute to samples (for building the tiny word-level vocabulary)."""
    texts = [r["expression"] for r in record.get("referring_expressions", [])]
    texts += [o["labels"][0] for o in record.get("objects", []) if o.get("labels")]  # generic categories
    texts += [record[k]["caption"] for k in ("gcg", "dense_caption") if k in record]
    texts += list(record.get("negatives", []))  # hard negatives are asked about too
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
