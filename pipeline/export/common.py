"""What every exporter shares: the committed samples of an output dir, streamed in shard order with
records read as schema v2, JSON lists written item by item, and mask unions."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from groundmill.schema import RLE, STATUS_OK, Record, upgrade_record
from groundmill.shards import iter_shard, read_index


@dataclass
class ExportSample:
    key: str
    record: Record
    media: bytes  # the stored image or video file
    ext: str

    @property
    def file_name(self) -> str:
        return f"{self.key}.{self.ext}"


def iter_samples(
    out_dir: Path, media_type: str | None = None, progress: bool = True
) -> Iterator[ExportSample]:
    """Every committed sample (of `media_type` if given), one at a time, with a progress bar.

    Shards hold one media kind, so only the shards of that kind are opened."""
    index = read_index(out_dir, columns=["shard", "status", "media_type"]).to_pylist()
    rows = [r for r in index if r["status"] == STATUS_OK and r["shard"]]
    rows = [r for r in rows if media_type is None or r["media_type"] == media_type]
    shards = sorted({r["shard"] for r in rows})
    with tqdm(
        total=len(rows), unit="sample", desc=f"export {media_type or 'all'}", disable=not progress
    ) as bar:
        for shard in shards:
            for key, files in iter_shard(out_dir / shard):
                record = upgrade_record(json.loads(files.pop("json")))
                if media_type is not None and record["media"]["type"] != media_type:
                    continue  # a v1 shard mixes media kinds
                ext = record["media"]["ext"]
                yield ExportSample(key, record, files[ext], ext)
                bar.update()


class JsonList:
    """A JSON list written one item at a time into a temp file, renamed into place on close."""

    brackets = "[]"

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._f: IO[str] = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)
        self._f.write(self.brackets[0])
        self.count = 0

    def _write(self, text: str) -> None:
        self._f.write(("," if self.count else "") + "\n" + text)
        self.count += 1

    def append(self, item: Any) -> None:
        self._write(json.dumps(item, ensure_ascii=False))

    def __enter__(self) -> JsonList:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._f.write("\n" + self.brackets[1] + "\n")
        self._f.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


class JsonDict(JsonList):
    """A JSON object written one entry at a time (see JsonList)."""

    brackets = "{}"

    def add(self, key: str, value: Any) -> None:
        self._write(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, path)


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _coco(rle: RLE) -> dict[str, Any]:
    return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def union_rle(rles: list[RLE]) -> RLE:
    """One mask covering all of `rles` (pycocotools merge), so a phrase's mask never overlaps itself."""
    merged = mask_utils.merge([_coco(r) for r in rles], intersect=0) if len(rles) > 1 else _coco(rles[0])
    return {"size": [int(v) for v in merged["size"]], "counts": merged["counts"].decode("ascii")}


def rle_area(rle: RLE) -> int:
    return int(mask_utils.area(_coco(rle)))


def rle_xywh(rle: RLE) -> list[float]:
    return [float(v) for v in np.asarray(mask_utils.toBbox(_coco(rle))).tolist()]
