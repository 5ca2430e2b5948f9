"""Readers of the field's benchmark layouts: each turns a dataset folder into evaluation items.

Items hold ground truth at the dataset's own resolution; the evaluator resizes predictions to it.
  refcoco / refcoco+ / refcocog  refer-API JSON or Parquet refs + COCO instances.json   (referring.py)
  reasonseg                      LISA's ReasonSeg: image + LabelMe-style JSON            (referring.py)
  grandf                         GranD-f GCG val/test COCO-format ground truth           (grandf.py)
  refytvos / mevis               meta_expressions.json, JPEG frames, PNG or RLE masks    (video.py)
  davis17                        DAVIS-2017 semi-supervised, 480p                        (video.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ReferItem:
    """One referring expression on one image; `groups` are the report rows it counts in."""

    image: Path
    text: str
    mask: np.ndarray
    groups: tuple[str, ...]
    ignore: np.ndarray | None = None


@dataclass
class VideoTarget:
    """One object to segment: by words (`text`) or by its first-frame mask (`prompt`)."""

    masks: list[np.ndarray]  # ground truth on every frame of the item
    text: str | None = None
    prompt: np.ndarray | None = None


@dataclass
class VideoItem:
    """A clip and its targets. `scored` are the frame indices scored; `exclusive` targets share one label
    map per frame (DAVIS result PNGs), so overlapping predictions go to the most confident object."""

    key: str
    frames: list[Path]
    targets: list[VideoTarget]
    groups: tuple[str, ...]
    scored: list[int] = field(default_factory=list)
    exclusive: bool = False


@dataclass
class GCGItem:
    """One GranD-f image: its reference captions, ground-truth phrases and their masks (COCO anns)."""

    image_id: int
    image: Path
    height: int
    width: int
    captions: list[str]
    labels: list[str]
    annotations: list[dict]  # the mask ground truth's COCO annotations of this image, in file order
    groups: tuple[str, ...]


@dataclass
class Layout:
    name: str
    task: str  # referring | video | gcg
    protocol: str


LAYOUTS = {
    name: Layout(name, "referring", "LISA referring protocol (dvlab-research/LISA validate): every sentence "
                 "of every ref in the split is one sample; cIoU = sum I / sum U, gIoU = mean I / (U + 1e-5)")
    for name in ("refcoco", "refcoco+", "refcocog")
} | {
    "reasonseg": Layout("reasonseg", "referring", "LISA ReasonSeg protocol: the first query of each image; "
                        "'ignore' polygons excluded from I and U; test also split by short / long query"),
    "grandf": Layout("grandf", "gcg", "GLaMM GCG protocol (groundingLMM eval/gcg/evaluate.py): COCO segm AP50 "
                     "with scores 1.0, greedy mIoU, recall at IoU >= 0.5 and phrase similarity >= 0.5; "
                     "METEOR / CIDEr via pycocoevalcap after its PTB tokenizer"),
    "refytvos": Layout("refytvos", "video", "Ref-YouTube-VOS / MeViS protocol (eval_mevis.py): J and F per "
                       "expression over all annotated frames, then the mean over expressions"),
    "mevis": Layout("mevis", "video", "MeViS protocol (eval_mevis.py): J and F per expression over all "
                    "frames, the union of its objects' masks, then the mean over expressions"),
    "davis17": Layout("davis17", "video", "DAVIS-2017 semi-supervised protocol (davis2017-evaluation): "
                      "first-frame masks given, first and last frames excluded, statistics per object, "
                      "then the mean over objects"),
}  # fmt: skip


def read_layout(
    name: str, root: str | Path, splits: list[str] | None = None, images: str | Path | None = None
):
    """Items of a benchmark layout (an iterator; ground-truth masks are decoded as it goes)."""
    from groundmill.model.evalsets import grandf, referring, video

    root = Path(root)
    if name in ("refcoco", "refcoco+", "refcocog"):
        return referring.refcoco_items(name, root, splits, images)
    readers = {
        "reasonseg": lambda: referring.reasonseg_items(root, splits),
        "grandf": lambda: grandf.grandf_items(root, splits, images),
        "refytvos": lambda: video.rvos_items(root, splits, mask_dict=False),
        "mevis": lambda: video.rvos_items(root, splits, mask_dict=True),
        "davis17": lambda: video.davis_items(root, splits),
    }
    if name not in readers:
        raise ValueError(f"unknown benchmark layout {name!r}; known: {sorted(LAYOUTS)} and 'shards'")
    return readers[name]()


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_labels(path: Path) -> np.ndarray:
    """A palette (or grey) PNG -> its integer label per pixel."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L")).astype(np.int64)
