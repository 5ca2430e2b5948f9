"""The review loop: uncertain objects out as Label Studio tasks, a Label Studio JSON export (written
here in the format Label Studio documents for "Export > JSON") back in as a new output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from groundmill.pipeline.cli import main
from groundmill.pipeline.export.common import iter_samples
from groundmill.pipeline.review import brush_mask, brush_rle
from groundmill.schema import check_record, decode_mask
from groundmill.shards import read_index


def test_brush_rle_round_trips_through_label_studio_sdk():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 1:8] = True
    mask[6, 0] = True
    assert (brush_mask(brush_rle(mask), 7, 9) == mask).all()


def label_studio_export(tasks: list[dict], answers: list[tuple[str, np.ndarray | None, bool]]) -> list[dict]:
    """Label Studio's JSON export of `tasks`: each with one annotation (decision, optional repainted
    brush mask, cancelled or not), with the keys Label Studio writes."""
    out = []
    for i, (t, (decision, mask, cancelled)) in enumerate(zip(tasks, answers, strict=False), 1):
        pred = {r["from_name"]: r for r in t["predictions"][0]["result"]}
        result = [{**pred["decision"], "id": f"d{i}", "origin": "manual", "value": {"choices": [decision]}}]
        if mask is not None:
            value = {"format": "rle", "rle": brush_rle(mask), "brushlabels": ["object"]}
            result.append({**pred["mask"], "id": f"m{i}", "origin": "manual", "value": value})
        annotation = {"id": 100 + i, "completed_by": 1, "result": result, "was_cancelled": cancelled,
                      "ground_truth": False, "created_at": "2026-01-01T00:00:00.000000Z",
                      "updated_at": "2026-01-01T00:00:00.000000Z", "draft_created_at": None, "lead_time": 4.2,
                      "prediction": {}, "result_count": len(result), "unique_id": f"u{i}", "import_id": None,
                      "last_action": None, "bulk_created": False, "task": i, "project": 1, "updated_by": 1,
                      "parent_prediction": None, "parent_annotation": None, "last_created_by": None}  # fmt: skip
        out.append({"id": i, "annotations": [annotation], "file_upload": None, "drafts": [],
                    "predictions": [], "data": t["data"], "meta": {}, "created_at": "2026-01-01T00:00:00.000000Z",
                    "updated_at": "2026-01-01T00:00:00.000000Z", "inner_id": i, "total_annotations": 1,
                    "cancelled_annotations": int(cancelled), "total_predictions": 0, "comment_count": 0,
                    "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
                    "updated_by": 1, "comment_authors": []})  # fmt: skip
    return out


def objects_by_place(out: Path) -> dict[tuple[str, int], dict]:
    return {(s.key, o["id"]): o for s in iter_samples(out, "image", progress=False)
            for o in s.record["objects"] + s.record["floating_objects"]}  # fmt: skip


def test_review_round_trip_applies_decisions_without_rerunning_models(grounded_run, tmp_path: Path):
    out = grounded_run[0]
    tasks_path = tmp_path / "tasks.json"
    assert (
        main(["review", "export", str(out), "--output", str(tasks_path), "--low", "0", "--high", "1.01"]) == 0
    )
    tasks = json.loads(tasks_path.read_text())
    before = objects_by_place(out)
    assert len(tasks) == sum("verification" in o and "segmentation" in o for o in before.values()) >= 3
    assert (tmp_path / "tasks_config.xml").read_text().startswith("<View>")
    first = tasks[0]
    where = first["data"]["groundmill"]
    assert (tmp_path / "tasks_images" / f"{where['key']}.jpg").exists()
    assert first["data"]["image"].endswith(f"tasks_images/{where['key']}.jpg")
    brush = next(r for r in first["predictions"][0]["result"] if r["type"] == "brushlabels")
    h, w = brush["original_height"], brush["original_width"]
    truth = decode_mask(before[(where["key"], where["object_id"])]["segmentation"])
    assert (brush_mask(brush["value"]["rle"], h, w) == truth).all()

    painted = np.zeros((h, w), bool)
    painted[2:10, 3:12] = True
    answers = [("reject", None, False), ("accept", painted, False), ("reject", None, True)]
    export = tmp_path / "label_studio_export.json"
    export.write_text(json.dumps(label_studio_export(tasks, answers)))
    new = tmp_path / "reviewed"
    assert main(["review", "import", str(out), str(export), "--output", str(new)]) == 0

    after = objects_by_place(new)
    places = [(t["data"]["groundmill"]["key"], t["data"]["groundmill"]["object_id"]) for t in tasks[:3]]
    rejected, accepted, cancelled = (after[p] for p in places)
    assert rejected["verification"]["accepted"] is False and rejected["verification"]["reviewed"] is True
    assert "review: reject" in rejected["verification"]["reasons"]
    assert accepted["verification"]["accepted"] is True
    assert (decode_mask(accepted["segmentation"]) == painted).all() and accepted[
        "segmentation_source"
    ] == "review"
    assert cancelled == before[places[2]]  # a cancelled annotation decides nothing
    untouched = [p for p in before if p not in places[:2]]
    assert all(after[p] == before[p] for p in untouched)
    old, fresh = read_index(out).to_pylist(), read_index(new).to_pylist()
    key = lambda r: (r["uri"], r["status"])  # noqa: E731
    assert sorted(map(key, old)) == sorted(map(key, fresh))  # error rows and duplicates carried over
    assert all(check_record(s.record) == [] for s in iter_samples(new, progress=False))
    assert json.loads((new / "run.json").read_text())["review"]["objects_changed"] == 2
    with pytest.raises(FileExistsError):
        main(["review", "import", str(out), str(export), "--output", str(new)])
