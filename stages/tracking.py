"""Video tracking: keyframe objects become masklets through the sam2 package's video predictor.

The video is decoded on the fly (the load step's frame sampling, upright) in chunks of `chunk_frames`
frames; consecutive chunks share one frame. Per chunk:

1. the active tracks, prompted with their last visible mask on the chunk's first frame, are propagated
   forward through the chunk;
2. on each keyframe in the chunk, its objects (from the detection / mask stages) are matched to the
   tracks' masks by mask IoU: a match votes for the track's label, an unmatched object starts a new
   track, propagated forward and backward within the chunk;
3. the masks go to the :class:`TrackBook` frame by frame; tracks that stay empty end.

Only one chunk of frames and one predictor state are alive at a time (the state is rebuilt per chunk,
with `offload_video_to_cpu` / `offload_state_to_cpu`), so memory does not grow with the video's length;
the price is that an object found late is tracked backward only to the first frame of its chunk.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from groundmill.media import FrameSampling, MediaError, sampled_frames, upright
from groundmill.schema import FrameTime, Record, decode_mask
from groundmill.schema import Track as TrackRecord
from groundmill.stages.base import Sample, SampleError, Stage
from groundmill.stages.tracks import TrackBook, match_by_iou

FrameMasks = dict[int, dict[int, np.ndarray]]  # chunk-local frame -> {track id: bool HxW mask}


class Propagator(Protocol):
    def propagate(self, frames: list[Image.Image], prompts: dict[int, tuple[int, np.ndarray]]) -> FrameMasks:
        """Masks of the prompted tracks on every frame of `frames`; prompts: track id -> (frame, mask)."""
        ...


class Sam2Propagator:
    """The sam2 video predictor over one chunk of in-memory frames."""

    def __init__(self, predictor: Any):
        self.predictor = predictor

    def propagate(self, frames: list[Image.Image], prompts: dict[int, tuple[int, np.ndarray]]) -> FrameMasks:
        # init_state reads a folder of "<n>.jpg" (it loads them all at once, so the folder can go).
        with tempfile.TemporaryDirectory(prefix="groundmill-chunk-") as folder:
            for n, image in enumerate(frames):
                image.save(os.path.join(folder, f"{n}.jpg"), quality=95)
            state = self.predictor.init_state(folder, offload_video_to_cpu=True, offload_state_to_cpu=True)
        for track_id, (frame, mask) in prompts.items():
            self.predictor.add_new_mask(state, frame, track_id, mask)
        start = min(frame for frame, _ in prompts.values())
        out: FrameMasks = {}
        for reverse in (False, True):
            for frame, ids, logits in self.predictor.propagate_in_video(
                state, start_frame_idx=start, reverse=reverse
            ):
                masks = (logits[:, 0] > 0).cpu().numpy()
                out.setdefault(frame, {}).update(zip(ids, masks, strict=True))
        return out


@dataclass
class Detection:
    mask: np.ndarray
    labels: list[str]
    origin: dict[str, int]  # {frame_index, object_id}


def keyframe_detections(
    record: Record, min_score: float, height: int, width: int
) -> dict[int, list[Detection]]:
    """frame_index -> the keyframe's objects (and floating objects) as masks; box-only objects become
    box-shaped masks, a cruder prompt that SAM2 still follows."""
    out: dict[int, list[Detection]] = {}
    for frame in record.get("keyframes", []):
        dets = []
        for obj in frame.get("objects", []) + frame.get("floating_objects", []):
            if obj.get("score", 1.0) < min_score:
                continue
            if "segmentation" in obj:
                mask = decode_mask(obj["segmentation"])
            else:
                mask = np.zeros((height, width), dtype=bool)
                x0, y0, x1, y1 = (round(v) for v in obj["bbox"])
                mask[max(0, y0) : y1, max(0, x0) : x1] = True
            if mask.any():
                dets.append(
                    Detection(
                        mask,
                        obj.get("labels", []),
                        {"frame_index": frame["frame_index"], "object_id": obj["id"]},
                    )
                )
        out[frame["frame_index"]] = dets
    return out


def frame_chunks(
    frames: Iterator[tuple[int, float, Image.Image]], size: int
) -> Iterator[list[tuple[int, float, Image.Image]]]:
    """Consecutive chunks of `size` frames, each starting with the previous chunk's last frame."""
    if size < 2:
        raise ValueError(f"chunks need at least 2 frames, got {size}")
    chunk: list[tuple[int, float, Image.Image]] = []
    yielded = False
    for item in frames:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk, yielded = [chunk[-1]], True
    if len(chunk) > 1 or (chunk and not yielded):
        yield chunk


@dataclass
class TrackingResult:
    tracks: list[TrackRecord]
    frame_times: list[FrameTime]  # every frame the tracker covered: the masklets' frames
    frames: int
    chunks: int


def track_video(
    frames: Iterator[tuple[int, float, Image.Image]],
    detections: dict[int, list[Detection]],
    propagator: Propagator,
    *,
    chunk_frames: int,
    min_iou: float,
    max_missing: int,
    max_tracks: int,
    min_area: int = 1,
    min_frames: int = 1,
) -> TrackingResult:
    """Tracks for upright `frames` (frame_index, time_s, image) from keyframe `detections`."""
    book = TrackBook(max_missing=max_missing, min_area=min_area)
    frame_times: dict[int, float] = {}
    chunks = 0
    size = (0, 0)
    for chunk in frame_chunks(frames, chunk_frames):
        size = (chunk[0][2].height, chunk[0][2].width)
        chunks += 1
        images = [image for _, _, image in chunk]
        carried = chunks > 1  # the first frame was already recorded with the previous chunk...
        known = set(book.tracks)  # ...for the tracks known then; new ones are recorded there too
        active = book.active()
        results: FrameMasks = (
            propagator.propagate(images, {t.track_id: (0, t.last_visible) for t in active}) if active else {}
        )
        for local, (frame_index, _, _) in enumerate(chunk):
            if (carried and local == 0) or frame_index not in detections:
                continue
            dets = detections[frame_index]
            here = {tid: m for tid, m in results.get(local, {}).items() if not book.tracks[tid].ended}
            matched, unmatched = match_by_iou(here, [d.mask for d in dets], min_iou)
            for d, tid in matched.items():
                book.vote(tid, dets[d].labels)
            prompts = {}
            for d in unmatched[: max(0, max_tracks - len(book.tracks))]:
                prompts[book.start(dets[d].labels, dets[d].origin).track_id] = (local, dets[d].mask)
            if prompts:
                for frame, masks in propagator.propagate(images, prompts).items():
                    results.setdefault(frame, {}).update(masks)
        for local, (frame_index, time_s, _) in enumerate(chunk):
            frame_times[frame_index] = round(time_s, 4)
            for tid, mask in sorted(results.get(local, {}).items()):
                if not (carried and local == 0 and tid in known):
                    book.observe(tid, frame_index, mask)
    times = [FrameTime(frame_index=f, time_s=t) for f, t in sorted(frame_times.items())]
    tracks = book.records([t["frame_index"] for t in times], *size, min_frames)
    return TrackingResult(tracks, times, len(times), chunks)


def video_frames(sample: Sample) -> Iterator[tuple[int, float, Image.Image]]:
    """The sample's frames as the load step sampled them, upright, decoded one at a time."""
    media = sample.record["media"]
    s = media.get("sampling", {})
    sampling = FrameSampling(
        fps=s.get("fps", 0.0), stride=s.get("stride", 1), max_frames=s.get("max_frames", 0)
    )
    rotation = media.get("rotation", 0)
    for index, t, frame in sampled_frames(sample.data, sampling):
        yield index, t, upright(frame, rotation)


class Sam2Tracking(Stage):
    name = "tracking"
    provides = ("tracks", "frame_times")
    requires = ("keyframes",)

    @dataclass
    class Params:
        chunk_frames: int = 16  # frames per predictor state (bounded memory); >= 2
        min_iou: float = 0.5  # mask IoU for a keyframe object to belong to an existing track
        max_missing: int = 8  # a track ends after this many consecutive frames without a mask
        max_tracks: int = 50
        min_score: float = 0.0  # keyframe objects scoring lower are not tracked
        min_area: int = 16  # pixels; smaller masks count as "not visible"
        min_frames: int = 1  # tracks visible on fewer frames are dropped

        def __post_init__(self) -> None:
            for key, ok in (("chunk_frames", self.chunk_frames >= 2), ("max_missing", self.max_missing >= 1),
                            ("min_frames", self.min_frames >= 1), ("min_iou", 0 < self.min_iou <= 1)):  # fmt: skip
                if not ok:
                    raise ValueError(f"key '{key}': {getattr(self, key)!r} is out of range")

    def setup(self) -> None:
        from groundmill.stages.sam2_models import load_video_predictor

        self.propagator = Sam2Propagator(load_video_predictor(self.model_spec, self.resources, self.seed))

    def process(self, samples: list[Sample]) -> None:
        for sample in samples:
            if sample.media_type != "video":
                continue
            self.track(sample)

    def track(self, sample: Sample) -> None:
        p = self.params
        media = sample.record["media"]
        start = time.perf_counter()
        try:
            result = track_video(
                video_frames(sample),
                keyframe_detections(sample.record, p.min_score, media["height"], media["width"]),
                self.propagator,
                chunk_frames=p.chunk_frames, min_iou=p.min_iou, max_missing=p.max_missing,
                max_tracks=p.max_tracks, min_area=p.min_area, min_frames=p.min_frames,
            )  # fmt: skip
        except MediaError as e:
            raise SampleError(f"cannot decode video frames: {e}") from None
        elapsed = time.perf_counter() - start
        tracks = result.tracks
        sample.record["tracks"] = tracks
        sample.record["frame_times"] = result.frame_times
        sample.stats["tracks"] = float(len(tracks))
        sample.stats["tracked_frames"] = float(result.frames)
        sample.stats["tracking_fps"] = round(result.frames / elapsed, 3) if elapsed > 0 else 0.0
        if tracks:
            sample.stats["track_consistency"] = round(float(np.mean([t["consistency"] for t in tracks])), 4)

    def provenance(self) -> dict[str, Any]:
        p = self.params
        return {**super().provenance(), "chunk_frames": p.chunk_frames, "min_iou": p.min_iou}
