"""GCG export: the verified, grounded dense caption in GranD-f's training form.

    gcg = {"file_name": "<key>.<ext>", "caption": str,
           "groundings": {phrase: {"token_positives": [start, end], "rle_masks": [RLE, ...]}}}

Only phrases whose objects all have masks are exported, so every phrase maps to masks, and every
span indexes the caption exactly (checked here, not assumed). A phrase text that occurs twice keeps
its first grounding: GranD-f keys groundings by phrase.
"""

from __future__ import annotations

from typing import Any

from groundmill.schema import FrameRecord, Record
from groundmill.stages.base import Sample, Stage


def gcg_record(file_name: str, frame: FrameRecord) -> dict[str, Any] | None:
    """The GCG sample of an image record, or None without an accepted, grounded dense caption."""
    dense = frame.get("dense_caption")
    if not dense or not dense.get("verification", {}).get("accepted"):
        return None
    caption = dense["caption"]
    masks = {
        o["id"]: o["segmentation"]
        for o in frame.get("objects", []) + frame.get("floating_objects", [])
        if "segmentation" in o
    }
    groundings: dict[str, dict[str, Any]] = {}
    for d in dense["details"]:
        start, end = d["tokens_positive"]
        if d["phrase"] in groundings or caption[start:end] != d["phrase"]:
            continue
        if d["ids"] and all(i in masks for i in d["ids"]):
            groundings[d["phrase"]] = {
                "token_positives": [start, end],
                "rle_masks": [masks[i] for i in d["ids"]],
            }
    if not groundings:
        return None
    return {"file_name": file_name, "caption": caption, "groundings": groundings}


class GCGExport(Stage):
    name = "gcg"
    provides = ("gcg",)
    requires = ("dense_caption",)
    uses_model = False

    def process(self, samples: list[Sample]) -> None:
        for sample in samples:
            record: Record = sample.record
            if record["media"]["type"] != "image":  # GranD-f's GCG form is per image
                continue
            gcg = gcg_record(f"{sample.key}.{record['media']['ext']}", record)
            if gcg is not None:
                record["gcg"] = gcg
                sample.stats["gcg.phrases"] = float(len(gcg["groundings"]))
