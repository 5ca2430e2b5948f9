"""Ref-YouTube-VOS / MeViS (meta_expressions.json) and DAVIS-2017 (semi-supervised) readers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from groundmill.model.evalsets import VideoItem, VideoTarget, load_labels
from groundmill.schema import decode_mask


def meta_file(root: Path, split: str) -> Path:
    """<root>/<split>/meta_expressions.json (MeViS) or <root>/meta_expressions/<split>/... (Ref-YouTube-VOS)."""
    for p in (
        root / split / "meta_expressions.json",
        root / "meta_expressions" / split / "meta_expressions.json",
    ):
        if p.exists():
            return p
    raise FileNotFoundError(f"no meta_expressions.json for split {split!r} under {root}")


def _ids(value: object) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def rvos_items(root: Path, splits: list[str] | None, mask_dict: bool) -> Iterator[VideoItem]:
    """One item per expression: every frame listed for its video, ground truth the union of its objects.
    Masks come from <split>/mask_dict.json by `anno_id` (MeViS) or <split>/Annotations/<vid>/<frame>.png
    palette ids by `obj_id` (Ref-YouTube-VOS; MeViS converted to PNGs)."""
    default = ("valid_u", "valid", "val", "train")
    for split in splits or [s for s in default if (root / s / "JPEGImages").is_dir()][:1]:
        meta = json.loads(meta_file(root, split).read_text())["videos"]
        rles = (
            json.loads((root / split / "mask_dict.json").read_text())
            if mask_dict and (root / split / "mask_dict.json").exists()
            else None
        )
        for vid in sorted(meta):
            frames = [root / split / "JPEGImages" / vid / f"{f}.jpg" for f in meta[vid]["frames"]]
            labels = (
                None
                if rles is not None
                else [
                    load_labels(root / split / "Annotations" / vid / f"{f}.png") for f in meta[vid]["frames"]
                ]
            )
            for exp_id in sorted(meta[vid]["expressions"], key=lambda k: int(k) if k.isdigit() else k):
                exp = meta[vid]["expressions"][exp_id]
                if rles is not None:
                    masks = _rle_masks(rles, _ids(exp["anno_id"]), frames)
                else:
                    masks = [np.isin(lab, _ids(exp["obj_id"])) for lab in labels]
                yield VideoItem(f"{vid}_{exp_id}", frames, [VideoTarget(masks, text=exp["exp"])], (split,),
                                scored=list(range(len(frames))))  # fmt: skip


def _rle_masks(rles: dict, anno_ids: list[int], frames: list[Path]) -> list[np.ndarray]:
    """MeViS: mask_dict[anno_id][frame] is an RLE or None; an expression's mask is their union."""
    with Image.open(frames[0]) as im:
        w, h = im.size
    out = []
    for t in range(len(frames)):
        m = np.zeros((h, w), bool)
        for a in anno_ids:
            if rles[str(a)][t]:
                m |= decode_mask(rles[str(a)][t])
        out.append(m)
    return out


def davis_items(root: Path, splits: list[str] | None, resolution: str = "480p") -> Iterator[VideoItem]:
    """DAVIS-2017 semi-supervised: per sequence of ImageSets/2017/<split>.txt, objects 1..N (N = the first
    annotation's highest id, 255 read as background), each prompted with its first-frame mask; every frame
    but the first and the last is scored (davis2017-evaluation)."""
    for split in splits or ["val"]:
        names = (root / "ImageSets" / "2017" / f"{split}.txt").read_text().split()
        for seq in names:
            frames = sorted((root / "JPEGImages" / resolution / seq).glob("*.jpg"))
            labels = [load_labels(p) for p in sorted((root / "Annotations" / resolution / seq).glob("*.png"))]
            if not frames or len(labels) != len(frames):
                raise FileNotFoundError(
                    f"DAVIS sequence {seq}: {len(frames)} frames, {len(labels)} annotations"
                )
            labels = [np.where(lab == 255, 0, lab) for lab in labels]
            targets = [
                VideoTarget([lab == k for lab in labels], prompt=labels[0] == k)
                for k in range(1, int(labels[0].max()) + 1)
            ]
            yield VideoItem(
                seq, frames, targets, (split,), scored=list(range(1, len(frames) - 1)), exclusive=True
            )
