"""GranD's per-image layout: ``DEST/annotations/<image stem>.json`` holds
``{file_name: {objects, floating_objects, floating_attributes, short_captions, captions, relationships,
dense_caption, additional_context, landmark}}``, what the GranD engine's own scripts pass between
levels (groundingLMM ``GranD/``): ``captions`` are plain strings, ``short_captions`` the grounded
short captions (``{caption, details[{phrase, tokens_positive, id, bbox}]}``, as GranD's level-2
short-caption grounding writes them), ``floating_attributes`` ``{bbox, labels, score, attributes}``.
Images only; the pictures go to ``DEST/images/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from groundmill.pipeline.export.common import ExportSample, iter_samples, write_file, write_json
from groundmill.schema import FrameRecord


def short_captions(frame: FrameRecord) -> list[dict[str, Any]]:
    """Each caption with the phrases grounded in it (exact spans from the grounding stage)."""
    boxes = {o["id"]: o["bbox"] for o in frame.get("objects", []) + frame.get("floating_objects", [])}
    out = [{"caption": c["text"], "details": []} for c in frame.get("captions", [])]
    for g in frame.get("relationships", {}).get("grounding", []):
        first = min(g["object_ids"])
        out[g["caption_index"]]["details"].append(
            {
                "phrase": g["phrase"],
                "tokens_positive": g["tokens_positive"],
                "id": first,
                "bbox": boxes.get(first),
            }
        )
    return out


def grand_entry(s: ExportSample) -> dict[str, Any]:
    frame = s.record
    relationships = frame.get("relationships", {})
    return {
        "objects": frame.get("objects", []),
        "floating_objects": frame.get("floating_objects", []),
        "floating_attributes": [
            {
                "bbox": a["bbox"],
                "labels": [" ".join(a["attributes"])],
                "score": a["score"],
                "attributes": a["attributes"],
                "detector": a["detector"],
            }
            for a in frame.get("floating_attributes", [])
        ],  # fmt: skip
        "short_captions": short_captions(frame),
        "captions": [c["text"] for c in frame.get("captions", [])],
        "relationships": {
            "grounding": relationships.get("grounding", []),
            "relations": relationships.get("relations", frame.get("scene_graph", {}).get("relations", [])),
        },  # fmt: skip
        "dense_caption": frame.get("dense_caption", {}),
        "additional_context": frame.get("additional_context", ""),
        "landmark": frame.get("landmark", {}),
    }


def write(out_dir: Path, dest: Path, progress: bool = True) -> dict[str, int]:
    (dest / "annotations").mkdir(exist_ok=True)
    n = 0
    for s in iter_samples(out_dir, "image", progress):
        write_file(dest / "images" / s.file_name, s.media)
        write_json(dest / "annotations" / f"{s.key}.json", {s.file_name: grand_entry(s)})
        n += 1
    return {"images": n}
