"""The review loop: people decide what the verifiers are unsure of (SAM 3's SA-Co engine sends
those items to human annotators), in Label Studio, without rerunning any model.

    groundmill review export OUT --output TASKS.json [--low 0.4 --high 0.8]
    groundmill review import OUT TASKS_EXPORT.json --output NEW

`export` writes a Label Studio task per uncertain object (its mask verifier score in [low, high)):
``data`` holds the picture (written beside TASKS.json, under ``<stem>_images/``, referenced through
`--image-url`, Label Studio's local-files URL by default), the question and where the object lives;
``predictions`` pre-annotate it with the mask as a Label Studio brush RLE (`label_studio_sdk.converter.
brush.mask2rle`) and the verifier's accept/reject. ``<stem>_config.xml`` is the labelling config those
names follow (an `Image`, a `BrushLabels` "mask", a `Choices` "decision").

`import` reads Label Studio's JSON export (tasks with their ``annotations[].result``, the format Label
Studio documents for "Export > JSON"), and writes a new output: every shard of OUT copied sample by
sample, each reviewed object with ``verification.accepted`` set by the decision (``reviewed: true``,
``"review: reject"`` among its reasons), and its mask replaced when the reviewer repainted it. Error
rows and everything else stay as they were; `run.json` records the review.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from groundmill.pipeline.export.common import iter_samples, write_file
from groundmill.pipeline.run import RUN_RECORD, claim_output
from groundmill.schema import Object, decode_mask, encode_mask, frame_records, upgrade_record
from groundmill.shards import INDEX_DIR, ShardWriter, iter_shard

FROM_MASK, FROM_DECISION, TO_IMAGE = "mask", "decision", "image"
LABEL_CONFIG = f"""<View>
  <Header value="$question"/>
  <Image name="{TO_IMAGE}" value="$image"/>
  <BrushLabels name="{FROM_MASK}" toName="{TO_IMAGE}"><Label value="object"/></BrushLabels>
  <Choices name="{FROM_DECISION}" toName="{TO_IMAGE}" choice="single" required="true">
    <Choice value="accept"/><Choice value="reject"/>
  </Choices>
</View>
"""


def brush_rle(mask: np.ndarray) -> list[int]:
    """A bool mask as Label Studio's brush RLE."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(mask.astype(np.uint8) * 255)


def brush_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio's brush RLE (RGBA, row-major) as a bool mask: its alpha channel."""
    from label_studio_sdk.converter.brush import decode_rle

    return decode_rle(rle).reshape(height, width, 4)[..., 3] > 0


def uncertain(obj: Object, low: float, high: float) -> bool:
    v = obj.get("verification")
    return v is not None and "segmentation" in obj and low <= v["score"] < high


def task(obj: Object, where: dict[str, Any], image_url: str, size: tuple[int, int]) -> dict[str, Any]:
    """One Label Studio task with the mask and the verifier's decision as predictions."""
    height, width = size
    label = obj["labels"][0] if obj["labels"] else "object"
    v = obj["verification"]
    common = {"to_name": TO_IMAGE, "original_width": width, "original_height": height, "image_rotation": 0}
    result = [
        {"id": "mask", "from_name": FROM_MASK, "type": "brushlabels", **common,
         "value": {"format": "rle", "rle": brush_rle(decode_mask(obj["segmentation"])), "brushlabels": ["object"]}},
        {"id": "decision", "from_name": FROM_DECISION, "type": "choices", **common,
         "value": {"choices": ["accept" if v["accepted"] else "reject"]}},
    ]  # fmt: skip
    question = f"Is the mask exactly one whole {label}, and nothing else? (fix it with the brush if needed)"
    return {
        "data": {"image": image_url, "question": question, "label": label, "groundmill": where,
                 "score": v["score"], "reasons": "; ".join(v["reasons"])},
        "predictions": [{"model_version": "groundmill-mask-verifier", "score": v["score"], "result": result}],
    }  # fmt: skip


def export_tasks(out_dir: Path, tasks_path: Path, low: float, high: float, image_url: str) -> int:
    """Write the uncertain objects of an output as Label Studio tasks; returns how many."""
    images_dir = tasks_path.with_name(f"{tasks_path.stem}_images")
    tasks = []
    for s in iter_samples(out_dir, "image", progress=False):
        objects = [o for g in ("objects", "floating_objects") for o in s.record.get(g, [])]
        chosen = [o for o in objects if uncertain(o, low, high)]
        if not chosen:
            continue
        write_file(images_dir / s.file_name, s.media)
        size = (s.record["media"]["height"], s.record["media"]["width"])
        url = f"{image_url}{images_dir.name}/{s.file_name}"
        tasks += [task(o, {"key": s.key, "frame": 0, "object_id": o["id"]}, url, size) for o in chosen]
    tasks_path.write_text(json.dumps(tasks, indent=1))
    tasks_path.with_name(f"{tasks_path.stem}_config.xml").write_text(LABEL_CONFIG)
    return len(tasks)


def decisions(exported: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(key, frame, object id) -> {"decision": accept|reject, "mask": RLE result or None} from a Label
    Studio JSON export; a task's last annotation that was not cancelled and chose a decision counts."""
    out = {}
    for t in exported:
        where = t["data"]["groundmill"]
        for ann in reversed(t.get("annotations", [])):
            if ann.get("was_cancelled"):
                continue
            by_name = {r["from_name"]: r for r in ann.get("result", [])}
            choice = by_name.get(FROM_DECISION, {}).get("value", {}).get("choices", [])
            if choice:
                out[(where["key"], int(where["frame"]), int(where["object_id"]))] = {
                    "decision": choice[0], "mask": by_name.get(FROM_MASK)}  # fmt: skip
                break
    return out


def apply_decision(obj: Object, decision: dict[str, Any], size: tuple[int, int]) -> None:
    v = obj["verification"]
    v["accepted"], v["reviewed"] = decision["decision"] == "accept", True
    if not v["accepted"]:
        v["reasons"].append("review: reject")
    painted = decision["mask"]
    if painted is not None and painted["value"].get("format") == "rle":
        mask = brush_mask(painted["value"]["rle"], *size)
        if mask.any():
            obj["segmentation"] = encode_mask(mask)
            obj["segmentation_source"] = "review"


def apply_to_record(record: dict[str, Any], found: dict[tuple[str, int, int], dict[str, Any]]) -> int:
    """Apply the decisions about one record in place; how many objects they changed."""
    size = (record["media"]["height"], record["media"]["width"])
    n = 0
    for f, frame in enumerate(frame_records(record)):
        for obj in frame.get("objects", []) + frame.get("floating_objects", []):
            d = found.get((record["key"], f, obj["id"]))
            if d is not None and "verification" in obj:
                apply_decision(obj, d, size)
                n += 1
    return n


def import_decisions(out_dir: Path, exported_path: Path, new_dir: Path) -> int:
    """Copy OUT into NEW with the reviewers' decisions applied; returns the objects changed."""
    if new_dir.exists() and any(new_dir.iterdir()):
        raise FileExistsError(f"{new_dir} is not empty: review import writes a new output")
    found = decisions(json.loads(exported_path.read_text()))
    claim_output(new_dir)
    changed = 0
    for part in sorted((out_dir / INDEX_DIR).glob("*.parquet")):
        rows = pq.read_table(part).to_pylist()
        stored = {r["key"]: r for r in rows if r["shard"]}
        writer = ShardWriter(new_dir, name=part.stem)
        if stored:
            for key, files in iter_shard(out_dir / next(iter(stored.values()))["shard"]):
                record = upgrade_record(json.loads(files.pop("json")))
                changed += apply_to_record(record, found)
                ext = record["media"]["ext"]
                writer.add_sample(key, files[ext], ext, record, row_fields(stored[key]))
        for row in rows:
            if not row["shard"]:  # error and duplicate rows
                writer.add_row(row_fields(row))
        writer.commit()
    run = json.loads((out_dir / RUN_RECORD).read_text()) if (out_dir / RUN_RECORD).exists() else {}
    run["review"] = {"from": str(out_dir), "decisions": str(exported_path), "objects_changed": changed}
    (new_dir / RUN_RECORD).write_text(json.dumps(run, indent=1))
    return changed


def row_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "shard"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="groundmill review", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="uncertain objects as Label Studio tasks")
    ex.add_argument("out_dir")
    ex.add_argument("--output", required=True, help="TASKS.json to write")
    ex.add_argument("--low", type=float, default=0.4, help="lowest verifier score sent to review")
    ex.add_argument("--high", type=float, default=0.8, help="scores from here up are not reviewed")
    ex.add_argument("--image-url", default="/data/local-files/?d=", help="prefix of the tasks' image URLs")
    im = sub.add_parser("import", help="apply a Label Studio JSON export to a new output")
    im.add_argument("out_dir")
    im.add_argument("tasks", help="Label Studio's JSON export of the reviewed tasks")
    im.add_argument("--output", required=True, help="new output directory")
    args = parser.parse_args(argv)
    if args.action == "export":
        n = export_tasks(Path(args.out_dir), Path(args.output), args.low, args.high, args.image_url)
        print(f"{args.output}: {n} tasks")
        return 0
    n = import_decisions(Path(args.out_dir), Path(args.tasks), Path(args.output))
    print(f"{args.output}: {n} objects changed")
    return 0
