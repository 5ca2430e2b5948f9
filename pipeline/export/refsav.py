"""Ref-SAV as Sa2VA's ``Sa2VA03RefVOS`` (``dataset_type='refsav'``) reads it, with ``image_folder=DEST``:

- ``DEST/meta.json``: ``{video_id: {video_path, anno_path, objects: {obj_id: {formated, ...}}}}``, paths
  relative to DEST; ``formated`` is the track's video-level expression (the object- and scene-level
  ones sit beside it);
- ``DEST/videos/<key>.mp4``: the stored video, unchanged;
- ``DEST/masklets/<key>.json``: ``{"masklet": [[RLE per object] per annotated frame]}``. Sa2VA decodes
  every frame with cv2, keeps ``frames[::4]`` and asserts ``len(masklet) == len(frames[::4])``, and an
  object's masks are column ``int(obj_id)``: so there is one entry per ``stride``-th decoded frame, an
  empty RLE where the track has no mask (or the tracker's sampling skipped that frame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from groundmill.media import FrameSampling, sampled_frames
from groundmill.pipeline.export.common import ExportSample, JsonDict, iter_samples, write_file, write_json
from groundmill.schema import RLE, empty_rle, masklet_by_frame


def decoded_frames(s: ExportSample) -> int:
    """How many frames a decoder gets from the stored video (what cv2 yields to Sa2VA)."""
    return sum(1 for _ in sampled_frames(s.media, FrameSampling()))


def refsav_entry(
    s: ExportSample, num_frames: int, stride: int
) -> tuple[dict[str, Any], list[list[RLE]]] | None:
    """(meta entry, masklet rows) of one video, or None without a track that has expressions."""
    tracks = {t["track_id"]: t for t in s.record.get("tracks", [])}
    expressions = [e for e in s.record.get("expressions", []) if e["track_id"] in tracks]
    if not expressions:
        return None
    objects = {
        str(col): {"formated": e["video_level"], "object_level": e["object_level"], "scene_level": e["scene_level"],
                   "video_level": e["video_level"], "track_id": e["track_id"], "labels": tracks[e["track_id"]]["labels"]}
        for col, e in enumerate(expressions)
    }  # fmt: skip
    media = s.record["media"]
    empty = empty_rle(media["height"], media["width"])
    masks = [masklet_by_frame(tracks[e["track_id"]]) for e in expressions]
    rows = [[m.get(f, empty) for m in masks] for f in range(0, num_frames, stride)]
    meta = {"video_path": f"videos/{s.file_name}", "anno_path": f"masklets/{s.key}.json", "objects": objects,
            "num_frames": num_frames, "frame_stride": stride}  # fmt: skip
    return meta, rows


def write(out_dir: Path, dest: Path, progress: bool = True, stride: int = 4) -> dict[str, int]:
    """`stride`: the annotated-frame step; Sa2VA reads ``frames[::4]``, so keep 4 for it."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    (dest / "masklets").mkdir(exist_ok=True)
    with JsonDict(dest / "meta.json") as meta:
        for s in iter_samples(out_dir, "video", progress):
            entry = refsav_entry(s, decoded_frames(s), stride)
            if entry is None:
                continue
            info, rows = entry
            write_file(dest / info["video_path"], s.media)
            write_json(dest / info["anno_path"], {"masklet": rows})
            meta.add(s.key, info)
    return {"videos": meta.count}
