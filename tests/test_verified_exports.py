"""Hard negatives and verified-only objects in the coco and grandf exports, read back with pycocotools
and as GranD-f's loaders read the list, on the shared run of the real stages (conftest)."""

from __future__ import annotations

import json
from pathlib import Path

from pycocotools.coco import COCO

from groundmill.pipeline.export import export
from groundmill.pipeline.export.common import iter_samples, rle_area
from groundmill.schema import is_verified


def test_coco_carries_negatives_as_lvis_fields_and_can_keep_verified_objects_only(
    grounded_run, tmp_path: Path
):
    out = grounded_run[0]
    records = {s.key: s.record for s in iter_samples(out, "image", progress=False)}
    assert records and all("negatives" in r and "concepts" in r for r in records.values())
    export(out, "coco", tmp_path / "all", progress=False, negatives=True)
    coco = COCO(str(tmp_path / "all" / "annotations.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image in coco.loadImgs(coco.getImgIds()):
        record = records[image["groundmill_key"]]
        assert [names[i] for i in image["neg_category_ids"]] == record["negatives"]
        missed = [c["phrase"] for c in record["concepts"] if c["present"] and not c["exhaustive"]]
        assert [names[i] for i in image["not_exhaustive_category_ids"]] == missed
    export(out, "coco", tmp_path / "verified", progress=False, verified_only=True)
    verified = json.loads((tmp_path / "verified" / "annotations.json").read_text())
    objects = [o for r in records.values() for o in r["objects"] + r["floating_objects"]]
    masked = [o for o in objects if "segmentation" in o and rle_area(o["segmentation"]) > 0]
    assert len(coco.getAnnIds()) == len(masked)
    assert len(verified["annotations"]) == sum(is_verified(o) for o in masked)
    assert "neg_category_ids" not in verified["images"][0]


def test_grandf_entries_list_the_negatives_when_asked(grounded_run, tmp_path: Path):
    out = grounded_run[0]
    negatives = {s.key: s.record["negatives"] for s in iter_samples(out, "image", progress=False)}
    export(out, "grandf", tmp_path / "g", progress=False, negatives=True)
    items = json.loads((tmp_path / "g" / "annotations.json").read_text())
    assert items and all(item["negatives"] == negatives[item["image_id"]] for item in items)
    export(out, "grandf", tmp_path / "plain", progress=False)
    assert all(
        "negatives" not in item for item in json.loads((tmp_path / "plain" / "annotations.json").read_text())
    )
