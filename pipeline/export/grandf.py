"""GranD-f GCG: ``DEST/annotations.json`` is one JSON list, the form GLaMM's GranD-f loader
(groundingLMM ``dataset/gcg_datasets/GranDf_gcg_ds.py``) and X2SAM's ``ImgGCGSegDataset._load_grandf_gcg``
read::

    [{"file_name", "image_id", "height", "width", "caption",
      "groundings": {phrase: {"token_positives": [start, end], "rle_masks": [RLE]}}}]

Each phrase gets one mask, the union of its objects' masks: GLaMM sums a phrase's RLEs into one map,
so separate overlapping masks would give values above 1. Pictures go to ``DEST/images/``.
``negatives=True`` adds ``"negatives": [phrase]`` to each entry (phrases verified absent: loaders
that read only the keys above ignore it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from groundmill.pipeline.export.common import ExportSample, JsonList, iter_samples, union_rle, write_file


def grandf_item(s: ExportSample, negatives: bool = False) -> dict[str, Any] | None:
    """The GranD-f entry of one image sample, or None without a GCG form."""
    gcg = s.record.get("gcg")
    if not gcg or not gcg["groundings"]:
        return None
    media = s.record["media"]
    groundings = {
        g["phrase"]: {"token_positives": list(g["tokens_positive"]), "rle_masks": [union_rle(g["rle_masks"])]}
        for g in gcg["groundings"]
    }
    item = {"file_name": s.file_name, "image_id": s.key, "height": media["height"], "width": media["width"],
            "caption": gcg["caption"], "groundings": groundings}  # fmt: skip
    return item | {"negatives": list(s.record.get("negatives", []))} if negatives else item


def write(out_dir: Path, dest: Path, progress: bool = True, negatives: bool = False) -> dict[str, int]:
    with JsonList(dest / "annotations.json") as items:
        for s in iter_samples(out_dir, "image", progress):
            item = grandf_item(s, negatives)
            if item is not None:
                write_file(dest / "images" / s.file_name, s.media)
                items.append(item)
    return {"images": items.count}
