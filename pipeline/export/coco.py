"""COCO instances (pycocotools `COCO`, `COCOeval`) and RefCOCO-style refs.

``DEST/annotations.json``: ``images{id, file_name, height, width}``, ``annotations{id, image_id,
category_id, segmentation (RLE), area, bbox [x, y, w, h], iscrowd}``, ``categories{id, name}`` (from
each object's best label), as the COCO format defines and pycocotools reads it. Every object and
floating object of an image with a non-empty mask is one annotation; the box is the mask's tight box.
``DEST/refs.json``: one ref per referring expression, with RefCOCO's keys (``ref_id, ann_id, image_id,
category_id, split, sentences[{sent, raw, tokens, sent_id}], sent_ids, file_name``); RefCOCO ships
refs as a pickle, this is JSON. Pictures go to ``DEST/images/<key>.<ext>``. Videos are not exported.

``negatives=True`` adds LVIS's per-image fields (the LVIS API reads them; COCO tools ignore them):
``neg_category_ids`` (the record's `negatives`, phrases verified absent) and
``not_exhaustive_category_ids`` (concepts the exhaustivity verifier found not exhaustive).
``verified_only=True`` leaves out the objects the mask verifier rejected.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from groundmill.pipeline.export.common import (
    ExportSample,
    JsonList,
    iter_samples,
    rle_area,
    rle_xywh,
    write_file,
)
from groundmill.schema import is_verified


def tokens(sentence: str) -> list[str]:
    """RefCOCO's `tokens`: lowercase words without punctuation."""
    return re.findall(r"[a-z0-9']+", sentence.lower())


class _Ids:
    def __init__(self) -> None:
        self.categories: dict[str, int] = {}
        self.annotation = 0
        self.ref = 0
        self.sentence = 0

    def category(self, name: str) -> int:
        return self.categories.setdefault(name, len(self.categories) + 1)


def _annotations(
    s: ExportSample, image_id: int, ids: _Ids, verified_only: bool = False
) -> dict[int, dict[str, Any]]:
    """object id -> its COCO annotation, for the objects and floating objects with a non-empty mask."""
    out = {}
    for floating, group in ((False, "objects"), (True, "floating_objects")):
        for obj in s.record.get(group, []):
            seg = obj.get("segmentation")
            if seg is None or rle_area(seg) == 0 or (verified_only and not is_verified(obj)):
                continue
            ids.annotation += 1
            out[obj["id"]] = {
                "id": ids.annotation, "image_id": image_id,
                "category_id": ids.category(obj["labels"][0] if obj["labels"] else "object"),
                "segmentation": seg, "area": rle_area(seg), "bbox": rle_xywh(seg), "iscrowd": 0,
                "score": obj["score"], "attributes": obj["attributes"], "floating": floating,
            }  # fmt: skip
    return out


def _refs(
    s: ExportSample, image_id: int, anns: dict[int, dict[str, Any]], ids: _Ids, split: str
) -> list[dict]:
    refs = []
    for ref in s.record.get("referring_expressions", []):
        ann = anns.get(ref["object_id"])
        if ann is None:
            continue
        ids.ref += 1
        ids.sentence += 1
        sentence = {"sent": ref["expression"], "raw": ref["expression"], "tokens": tokens(ref["expression"]),
                    "sent_id": ids.sentence}  # fmt: skip
        refs.append({"ref_id": ids.ref, "ann_id": ann["id"], "image_id": image_id, "category_id": ann["category_id"],
                     "split": split, "sentences": [sentence], "sent_ids": [ids.sentence], "file_name": s.file_name})  # fmt: skip
    return refs


def _assemble(path: Path, images: Path, annotations: Path, categories: dict[str, int]) -> None:
    """annotations.json from the streamed image and annotation lists, copied without loading them."""
    tmp = path.with_name(f".{path.name}.tmp")
    cats = [{"id": i, "name": name, "supercategory": "object"} for name, i in categories.items()]
    with open(tmp, "w", encoding="utf-8") as out:
        out.write('{"info": {"description": "groundmill export"}, "licenses": [], "images": ')
        for part, key in ((images, "annotations"), (annotations, "categories")):
            with open(part, encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
            out.write(f', "{key}": ')
        out.write(json.dumps(cats) + "}\n")
    tmp.replace(path)
    images.unlink()
    annotations.unlink()


def lvis_fields(record: dict[str, Any], ids: _Ids) -> dict[str, list[int]]:
    """LVIS's image-level labels: categories verified absent, and those not exhaustively annotated."""
    return {
        "neg_category_ids": [ids.category(p) for p in record.get("negatives", [])],
        "not_exhaustive_category_ids": [
            ids.category(c["phrase"])
            for c in record.get("concepts", [])
            if c["present"] and not c["exhaustive"]
        ],
    }


def write(out_dir: Path, dest: Path, progress: bool = True, split: str = "train", negatives: bool = False,
          verified_only: bool = False) -> dict[str, int]:  # fmt: skip
    ids = _Ids()
    parts = dest / ".images.json", dest / ".annotations.json"
    with (
        JsonList(parts[0]) as images,
        JsonList(parts[1]) as annotations,
        JsonList(dest / "refs.json") as refs,
    ):
        for image_id, s in enumerate(iter_samples(out_dir, "image", progress), 1):
            write_file(dest / "images" / s.file_name, s.media)
            media = s.record["media"]
            image = {"id": image_id, "file_name": s.file_name, "height": media["height"], "width": media["width"],
                     "groundmill_key": s.key}  # fmt: skip
            images.append(image | lvis_fields(s.record, ids) if negatives else image)
            anns = _annotations(s, image_id, ids, verified_only)
            for ann in anns.values():
                annotations.append(ann)
            for ref in _refs(s, image_id, anns, ids, split):
                refs.append(ref)
    _assemble(dest / "annotations.json", *parts, ids.categories)
    return {"images": images.count, "annotations": annotations.count, "refs": refs.count,
            "categories": len(ids.categories)}  # fmt: skip
