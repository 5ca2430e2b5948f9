"""Tiny datasets written in the field's benchmark layouts (RefCOCO refer API, ReasonSeg, GranD-f GCG,
Ref-YouTube-VOS, MeViS, DAVIS-2017), with the ground truth each writer put in them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from groundmill.schema import encode_mask

PALETTE = [0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [0, 0, 0] * 251 + [255, 255, 255]


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="JPEG")


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    im.save(path)


# RefCOCO: COCO instances.json + refs(<splitBy>) with a polygon annotation and an RLE annotation.
REF_H, REF_W = 20, 30


def write_refcoco(root: Path, dataset: str = "refcoco", fmt: str = "json") -> dict[int, np.ndarray]:
    """Three refs (val: 2 sentences, testA: 1, train: 1) on two images; returns ann_id -> true mask."""
    split_by = "umd" if dataset == "refcocog" else "unc"
    names = ["COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"]
    for i, n in enumerate(names):
        write_jpeg(root / "images" / n, REF_H, REF_W, seed=i)
    rle_mask = box(REF_H, REF_W, 10, 18, 15, 28)
    instances = {
        "images": [{"id": i + 1, "file_name": n, "height": REF_H, "width": REF_W} for i, n in enumerate(names)],
        "annotations": [
            # Polygon (x, y) corners (2, 3)-(10, 8): pycocotools fills rows 3..7, columns 2..9.
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]], "area": 40,
             "bbox": [2, 3, 8, 5], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": encode_mask(rle_mask), "area": 104,
             "bbox": [15, 10, 13, 8], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    refs = [
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "category_id": 1, "split": "val",
         "sentences": [{"sent": "The left box ", "tokens": ["the", "left", "box"]}, {"sent": "small box", "tokens": []}]},
        {"ref_id": 2, "ann_id": 12, "image_id": 2, "category_id": 1, "split": "testA",
         "sentences": [{"sent": "box on the right", "tokens": []}]},
        {"ref_id": 3, "ann_id": 11, "image_id": 1, "category_id": 1, "split": "train",
         "sentences": [{"sent": "training only", "tokens": []}]},
    ]  # fmt: skip
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    if fmt == "json":
        (folder / f"refs({split_by}).json").write_text(json.dumps(refs))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(refs), folder / f"refs({split_by}).parquet")
    else:
        (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs))
    return {11: box(REF_H, REF_W, 3, 8, 2, 10), 12: rle_mask}


def write_reasonseg(root: Path) -> None:
    """val/a: a small target square inside a large 'ignore' square, plus a 'flag' shape; test/b: a long
    (is_sentence) query with one target."""
    write_jpeg(root / "val" / "a.jpg", 20, 30)
    shapes = [
        {"label": "ignore", "points": [[0, 0], [19, 0], [19, 19], [0, 19]], "shape_type": "polygon"},
        {"label": "target", "points": [[4, 4], [8, 4], [8, 8], [4, 8]], "shape_type": "polygon"},
        {"label": "flag", "points": [[25, 0], [29, 0], [29, 5]], "shape_type": "polygon"},
    ]
    anno = {"text": ["what holds the tea?", "second query"], "is_sentence": False, "shapes": shapes}
    (root / "val" / "a.json").write_text(json.dumps(anno))
    write_jpeg(root / "test" / "b.jpg", 16, 16, seed=1)
    target = [{"label": "target", "points": [[2, 2], [10, 2], [10, 6], [2, 6]], "shape_type": "polygon"}]
    long = {"text": ["the thing you would sit on after a long walk"], "is_sentence": True, "shapes": target}
    (root / "test" / "b.json").write_text(json.dumps(long))


def write_grandf(root: Path, split: str = "val") -> list[np.ndarray]:
    """One image with two grounded phrases in GLaMM's val/test COCO files; returns their masks."""
    h, w = 24, 32
    write_jpeg(root / "GranDf_HA_images" / "val_test" / "g1.jpg", h, w)
    masks = [box(h, w, 2, 10, 2, 12), box(h, w, 12, 22, 14, 30)]
    ann_dir = root / "annotations" / "val_test"
    ann_dir.mkdir(parents=True, exist_ok=True)
    images = [{"id": 7, "file_name": "g1.jpg", "height": h, "width": w}]
    mask_gt = {
        "images": images,
        "annotations": [{"id": i + 1, "image_id": 7, "category_id": 1, "segmentation": encode_mask(m),
                         "area": int(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0} for i, m in enumerate(masks)],
        "categories": [{"id": 1, "name": "object"}],
    }  # fmt: skip
    caption = "A red kite flies above a green field."
    cap_gt = {"images": images, "annotations": [{"id": 1, "image_id": 7, "caption": caption,
                                                  "labels": ["A red kite", "a green field"]}]}  # fmt: skip
    (ann_dir / f"{split}_gcg_coco_mask_gt.json").write_text(json.dumps(mask_gt))
    (ann_dir / f"{split}_gcg_coco_caption_gt.json").write_text(json.dumps(cap_gt))
    return masks


# Videos: 4 frames of 18x24; object 1 moves right, object 2 stays.
VID_H, VID_W, VID_T = 18, 24, 4


def video_labels() -> list[np.ndarray]:
    out = []
    for t in range(VID_T):
        lab = np.zeros((VID_H, VID_W), np.uint8)
        lab[2:8, 2 + 2 * t : 8 + 2 * t] = 1
        lab[10:16, 14:22] = 2
        out.append(lab)
    return out


def write_rvos(root: Path, mevis: bool = False) -> list[np.ndarray]:
    """Ref-YouTube-VOS (Annotations PNGs, meta_expressions/<split>/) or MeViS (valid_u/, mask_dict.json
    by anno_id). Expressions: 0 -> object 1, 1 -> objects 1 and 2 (MeViS multi-object)."""
    split = "valid_u" if mevis else "valid"
    frames = [f"{5 * t:05d}" for t in range(VID_T)]
    labels = video_labels()
    for t, f in enumerate(frames):
        write_jpeg(root / split / "JPEGImages" / "vid1" / f"{f}.jpg", VID_H, VID_W, seed=t)
    if mevis:
        exps = {"0": {"exp": "the moving square", "obj_id": [1], "anno_id": [10]},
                "1": {"exp": "all squares", "obj_id": [1, 2], "anno_id": [10, 20]}}  # fmt: skip
        rles = {"10": [encode_mask(lab == 1) for lab in labels],
                "20": [encode_mask(lab == 2) if t else None for t, lab in enumerate(labels)]}  # fmt: skip
        (root / split / "mask_dict.json").write_text(json.dumps(rles))
        meta_path = root / split / "meta_expressions.json"
    else:
        exps = {
            "0": {"exp": "the moving square", "obj_id": "1"},
            "1": {"exp": "the still square", "obj_id": "2"},
        }
        for f, lab in zip(frames, labels, strict=True):
            write_palette_png(root / split / "Annotations" / "vid1" / f"{f}.png", lab)
        meta_path = root / "meta_expressions" / split / "meta_expressions.json"
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps({"videos": {"vid1": {"expressions": exps, "frames": frames}}}))
    return labels


def write_davis(root: Path) -> list[np.ndarray]:
    """DAVIS-2017 val with one sequence of two objects and a void (255) border."""
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("seq1\n")
    labels = video_labels()
    for t, lab in enumerate(labels):
        voided = lab.copy()
        voided[0, :] = 255
        write_jpeg(root / "JPEGImages" / "480p" / "seq1" / f"{t:05d}.jpg", VID_H, VID_W, seed=t)
        write_palette_png(root / "Annotations" / "480p" / "seq1" / f"{t:05d}.png", voided)
    return labels
