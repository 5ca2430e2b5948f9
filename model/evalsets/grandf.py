"""GranD-f GCG val/test (GLaMM's release): {split}_gcg_coco_mask_gt.json (COCO instances, one annotation
per grounded phrase) and {split}_gcg_coco_caption_gt.json (COCO captions whose annotations carry the
phrases as `labels`, in the order of the image's mask annotations)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from groundmill.model.evalsets import GCGItem


def gt_files(root: Path, split: str) -> tuple[Path, Path]:
    for folder in (root, root / "annotations" / "val_test", root / "val_test"):
        mask, cap = folder / f"{split}_gcg_coco_mask_gt.json", folder / f"{split}_gcg_coco_caption_gt.json"
        if mask.exists() and cap.exists():
            return mask, cap
    raise FileNotFoundError(
        f"no {split}_gcg_coco_mask_gt.json + {split}_gcg_coco_caption_gt.json under {root}"
    )


def image_folder(root: Path, images: str | Path | None, file_name: str) -> Path:
    candidates = [Path(images)] if images else []
    candidates += [
        root / "GranDf_HA_images" / "val_test",
        root / "images" / "val_test",
        root / "images",
        root,
    ]
    for c in candidates:
        if (c / file_name).exists():
            return c
    raise FileNotFoundError(f"{file_name} not found in any of {[str(c) for c in candidates]} (use --images)")


def grandf_items(root: Path, splits: list[str] | None, images: str | Path | None) -> Iterator[GCGItem]:
    """Every image of the caption ground truth, in file order (GLaMM evaluates those image ids)."""
    for split in splits or [s for s in ("val", "test") if _has(root, s)]:
        mask_path, cap_path = gt_files(root, split)
        masks, caps = json.loads(mask_path.read_text()), json.loads(cap_path.read_text())
        anns, captions = defaultdict(list), defaultdict(list)
        for a in masks["annotations"]:
            anns[a["image_id"]].append(a)
        for c in caps["annotations"]:
            captions[c["image_id"]].append(c)
        folder = None
        for info in caps["images"]:
            folder = folder or image_folder(root, images, info["file_name"])
            caption_anns = captions[info["id"]]
            yield GCGItem(info["id"], folder / info["file_name"], info["height"], info["width"],
                          [c["caption"] for c in caption_anns], list(caption_anns[0]["labels"]) if caption_anns else [],
                          anns[info["id"]], (split,))  # fmt: skip


def _has(root: Path, split: str) -> bool:
    try:
        gt_files(root, split)
    except FileNotFoundError:
        return False
    return True
