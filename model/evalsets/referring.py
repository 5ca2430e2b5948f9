"""RefCOCO / RefCOCO+ / RefCOCOg (refer API layout) and ReasonSeg (LISA) readers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from groundmill.model.evalsets import ReferItem

SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
EVAL_SPLITS = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
}
PICKLE_HELP = (
    "{path} is a Python pickle, which groundmill does not load (unpickling runs code). Convert it once,"
    " where you trust the file, to the JSON the refer API holds: load it with Python's pickle module"
    " (encoding='latin1') and json.dump the list of refs to {json} (the README's 'Evaluation on the"
    " field's benchmarks' gives the one-line command), or to Parquet (one row per ref: ref_id, ann_id,"
    " image_id, split, sentences[{{sent}}])."
)


def find_refs(root: Path, dataset: str) -> Path:
    """refs(<splitBy>).json or .parquet; the pickle alone is refused with the conversion command."""
    split_by = SPLIT_BY[dataset]
    for ext in (".json", ".parquet"):
        if (root / f"refs({split_by}){ext}").exists():
            return root / f"refs({split_by}){ext}"
    pickle = root / f"refs({split_by}).p"
    if pickle.exists():
        raise ValueError(PICKLE_HELP.format(path=pickle, json=pickle.with_suffix(".json")))
    raise FileNotFoundError(f"no refs({split_by}).json or refs({split_by}).parquet under {root}")


def read_refs(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return json.loads(path.read_text())


def image_dir(root: Path, images: str | Path | None, file_name: str) -> Path:
    """The COCO train2014 folder: --images, else root/images, root/train2014, or beside the dataset
    folder: images/ or LISA's refer_seg/images/mscoco/images/train2014."""
    candidates = [Path(images)] if images else []
    candidates += [
        root / "images",
        root / "train2014",
        root.parent / "images",
        root.parent / "images" / "mscoco" / "images" / "train2014",
    ]
    for c in candidates:
        if (c / file_name).exists():
            return c
    raise FileNotFoundError(f"{file_name} not found in any of {[str(c) for c in candidates]} (use --images)")


def ann_mask(segmentation: list | dict, h: int, w: int) -> np.ndarray:
    """A COCO annotation's mask: polygons (each rasterised by pycocotools, then their union) or RLE.
    LISA sums the polygons' maps; the union differs only where one object's polygons overlap."""
    if not segmentation:
        return np.zeros((h, w), bool)
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rles = [mask_utils.frPyObjects(segmentation, h, w)]
    else:
        counts = segmentation["counts"]
        rles = [
            {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
        ]
    return mask_utils.decode(rles).reshape(h, w, -1).any(-1)


def refcoco_items(
    dataset: str, root: Path, splits: list[str] | None, images: str | Path | None
) -> Iterator[ReferItem]:
    """Every sentence of every ref in the splits (default: the dataset's val and test splits), grouped by
    image, the target being the ref's annotation mask (LISA's refer_seg ValDataset)."""
    refs = read_refs(find_refs(root, dataset))
    instances = json.loads((root / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    imgs = {i["id"]: i for i in instances["images"]}
    wanted = tuple(splits) if splits else EVAL_SPLITS[dataset]
    folder = None
    for ref in sorted((r for r in refs if r["split"] in wanted), key=lambda r: (r["image_id"], r["ref_id"])):
        info = imgs[ref["image_id"]]
        folder = folder or image_dir(root, images, info["file_name"])
        mask = ann_mask(anns[ref["ann_id"]]["segmentation"], info["height"], info["width"])
        for sentence in ref["sentences"]:
            text = sentence["sent"].strip().lower()  # as LISA's ValDataset gives it to the model
            yield ReferItem(folder / info["file_name"], text, mask, (ref["split"],))


def labelme_mask(shapes: list[dict], h: int, w: int) -> np.ndarray:
    """LISA's get_mask_from_json: polygons labelled 'flag' skipped, the others drawn largest first (by
    their own drawn area; cv2 outline of width 1, then fill, points truncated to int32), 'ignore' ones as
    255, the rest as 1."""
    import cv2  # opencv-python-headless: LISA's rasteriser, so edge pixels agree

    def draw(target: np.ndarray, points: list, value: int) -> None:
        poly = np.array([points], dtype=np.int32)
        cv2.polylines(target, poly, True, value, 1)
        cv2.fillPoly(target, poly, value)

    kept, areas = [], []
    for shape in shapes:
        if shape["label"].lower() == "flag":
            continue
        alone = np.zeros((h, w), np.uint8)
        draw(alone, shape["points"], 1)
        kept.append(shape)
        areas.append(int(alone.sum()))
    label = np.zeros((h, w), np.uint8)
    for i in np.argsort(areas)[::-1]:
        draw(label, kept[i]["points"], 255 if "ignore" in kept[i]["label"].lower() else 1)
    return label


def reasonseg_items(root: Path, splits: list[str] | None) -> Iterator[ReferItem]:
    """ReasonSeg/<split>/<name>.jpg + <name>.json: the first query (`text[0]`, LISA's ValDataset) of each
    image. Rows: the split, and for test also `test/short` and `test/long` (is_sentence)."""
    for split in splits or [s for s in ("val", "test") if (root / s).is_dir()]:
        for image in sorted((root / split).glob("*.jpg")):
            anno = json.loads(image.with_suffix(".json").read_text())
            with Image.open(image) as im:
                w, h = im.size
            label = labelme_mask(anno["shapes"], h, w)
            kind = "long" if anno.get("is_sentence") else "short"
            groups = (split, f"{split}/{kind}") if split == "test" else (split,)
            yield ReferItem(image, anno["text"][0], label == 1, groups, ignore=label == 255)
