"""A Hugging Face dataset: Parquet files with typed `datasets` features (``Image`` for the pictures),
in two configs named by a dataset card, so ``datasets.load_dataset(DEST)`` opens the images and
``load_dataset(DEST, "videos")`` the videos, each as split ``train``::

    DEST/README.md                     configs: images (default) -> images/*.parquet, videos -> videos/*.parquet
    DEST/images/train-00000.parquet    key, image, width, height, objects, referring_expressions, captions,
                                       dense_caption, gcg, landmark, record (the whole record as JSON)
    DEST/videos/train-00000.parquet    key, video (the file's bytes), ext, width, height, fps, num_frames,
                                       tracks (masklets), expressions, video_captions, record

Every row has every column (a typed null where a record lacks one), which is what `datasets` needs;
the schema's `huggingface` metadata carries the features (datasets' own convention). Rows are written
in row groups as they stream, so memory stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value

from groundmill.pipeline.export.common import ExportSample, iter_samples

ROWS_PER_GROUP = 64  # rows held in memory at once (pictures and records): the export's memory bound
ROWS_PER_FILE = 4096

RLE_FEATURE = {"size": List(Value("int32")), "counts": Value("string")}
OBJECT = {
    "id": Value("int32"), "bbox": List(Value("float32")), "labels": List(Value("string")),
    "attributes": List(Value("string")), "score": Value("float32"), "floating": Value("bool"),
    "segmentation": RLE_FEATURE,
}  # fmt: skip
IMAGE_FEATURES = Features(
    {
        "key": Value("string"), "image": Image(), "width": Value("int32"), "height": Value("int32"),
        "objects": List(OBJECT),
        "referring_expressions": List({"object_id": Value("int32"), "expression": Value("string"),
                                       "source": Value("string")}),
        "captions": List(Value("string")),
        "dense_caption": Value("string"),
        "gcg": {"caption": Value("string"),
                "groundings": List({"phrase": Value("string"), "tokens_positive": List(Value("int32")),
                                    "object_ids": List(Value("int32")), "rle_masks": List(RLE_FEATURE)})},
        "landmark": Value("string"),
        "stuff": List({"id": Value("int32"), "label": Value("string"), "score": Value("float32"),
                       "area": Value("int64"), "segmentation": RLE_FEATURE}),
        "coverage": Value("float32"),
        "record": Value("string"),
    }
)  # fmt: skip
LEVELS = {"object_level": Value("string"), "scene_level": Value("string"), "video_level": Value("string")}
VIDEO_FEATURES = Features(
    {
        "key": Value("string"), "video": Value("binary"), "ext": Value("string"), "width": Value("int32"),
        "height": Value("int32"), "fps": Value("float32"), "num_frames": Value("int32"),
        "tracks": List({"track_id": Value("int32"), "labels": List(Value("string")),
                        "masklet": List({"frame_index": Value("int32"), "segmentation": RLE_FEATURE})}),
        "expressions": List({"track_id": Value("int32"), **LEVELS}),
        "video_captions": List(Value("string")),
        "record": Value("string"),
    }
)  # fmt: skip


def dataset_card(configs: list[str]) -> str:
    """README.md whose YAML names the configs (the first is the default) and their files."""
    lines = ["---", "configs:"]
    for i, name in enumerate(configs):
        lines += [f"- config_name: {name}", f"  data_files: {name}/*.parquet"] + (
            ["  default: true"] if i == 0 else []
        )
    lines += ["---", "# groundmill export", "", "Written by `groundmill export --format hf`: schema v2 records, each whole",
              "in the `record` column as JSON.", ""]  # fmt: skip
    return "\n".join(lines)


def _objects(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"id": o["id"], "bbox": o["bbox"], "labels": o["labels"], "attributes": o["attributes"], "score": o["score"],
         "floating": floating, "segmentation": o.get("segmentation")}
        for floating, group in ((False, "objects"), (True, "floating_objects"))
        for o in record.get(group, [])
    ]  # fmt: skip


def image_row(s: ExportSample) -> dict[str, Any]:
    r, media = s.record, s.record["media"]
    landmark = r.get("landmark")
    return {
        "key": s.key, "image": {"bytes": s.media, "path": s.file_name}, "width": media["width"],
        "height": media["height"], "objects": _objects(r),
        "referring_expressions": [{k: e[k] for k in ("object_id", "expression", "source")}
                                  for e in r.get("referring_expressions", [])],
        "captions": [c["text"] for c in r.get("captions", [])],
        "dense_caption": r.get("dense_caption", {}).get("caption"),
        "gcg": {"caption": r["gcg"]["caption"], "groundings": r["gcg"]["groundings"]} if "gcg" in r else None,
        "landmark": (landmark.get("fine") or landmark.get("category")) if landmark else None,
        "stuff": r.get("stuff", []), "coverage": r.get("coverage"),
        "record": json.dumps(r, ensure_ascii=False),
    }  # fmt: skip


def video_row(s: ExportSample) -> dict[str, Any]:
    r, media = s.record, s.record["media"]
    return {
        "key": s.key, "video": s.media, "ext": s.ext, "width": media["width"], "height": media["height"],
        "fps": media.get("fps"), "num_frames": media.get("num_frames"),
        "tracks": [{"track_id": t["track_id"], "labels": t["labels"], "masklet": t["masklet"]}
                   for t in r.get("tracks", [])],
        "expressions": [{"track_id": e["track_id"], **{k: e[k] for k in LEVELS}} for e in r.get("expressions", [])],
        "video_captions": [c["text"] for c in r.get("video_captions", [])],
        "record": json.dumps(r, ensure_ascii=False),
    }  # fmt: skip


class _ParquetParts:
    """Rows -> DEST/<folder>/train-NNNNN.parquet, row group by row group."""

    def __init__(self, folder: Path, features: Features):
        self.folder, self.features = folder, features
        self.schema = features.arrow_schema
        self.rows: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_file = self.files = self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(self.features.encode_example(row))
        if len(self.rows) >= ROWS_PER_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.folder / f"train-{self.files:05d}.parquet", self.schema)
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.count += len(self.rows)
        self.in_file += len(self.rows)
        self.rows = []
        if self.in_file >= ROWS_PER_FILE:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.in_file, self.files = None, 0, self.files + 1


def write(out_dir: Path, dest: Path, progress: bool = True) -> dict[str, int]:
    parts = {"image": _ParquetParts(dest / "images", IMAGE_FEATURES),
             "video": _ParquetParts(dest / "videos", VIDEO_FEATURES)}  # fmt: skip
    rows = {"image": image_row, "video": video_row}
    for s in iter_samples(out_dir, None, progress):
        kind = s.record["media"]["type"]
        parts[kind].add(rows[kind](s))
    for p in parts.values():
        p.flush()
        p.close()
    written = [p.folder.name for p in parts.values() if p.count]
    (dest / "README.md").write_text(dataset_card(written or ["images"]))
    return {"images": parts["image"].count, "videos": parts["video"].count}
