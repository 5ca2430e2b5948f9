"""The first step of every run: read each input, key it by content, drop duplicates, normalise it.

Every input leaves this step as exactly one row: a sample ready for the stages, a duplicate of an
earlier input, or an error with its reason.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from groundmill.media import (
    FrameSampling,
    MediaError,
    VideoLimits,
    is_video_uri,
    normalise_image,
    probe_video,
)
from groundmill.pipeline.config import LimitsConfig, VideoConfig
from groundmill.pipeline.sources import InputError, read_uri, redact_uri
from groundmill.schema import (
    STATUS_ERROR,
    ErrorCode,
    FrameRecord,
    Record,
    Source,
    content_key,
    error_reason,
    new_record,
)
from groundmill.stages.base import ROW_SCHEMA, STATUS_DUPLICATE, Sample

LOAD_STAGE = "load"


@ray.remote(num_cpus=0)
class KeyRegistry:
    """Decides which input owns each content key, so duplicate inputs are annotated once.

    The answer for a (key, uri) pair never changes, so a retried task gets the same decision. On a
    resumed run it starts from the keys already committed to the index.
    """

    def __init__(self, committed: dict[str, str]):
        self.owner = dict(committed)

    def claim(self, pairs: list[tuple[str, str]]) -> list[str]:
        """For each (key, uri): the uri that owns the key (the caller's own uri if it is first)."""
        return [self.owner.setdefault(key, uri) for key, uri in pairs]


@dataclass
class Loaded:
    sample: Sample
    raw: bytes | None


def _error(uri: str, key: str | None, reason: str, record: Record | None = None) -> Sample:
    """An error row of the load step; `reason` is `error_reason(code, ...)`, so it starts with [code]."""
    return Sample(
        uri=uri, key=key, media_type="", data=b"", frames=[], record=record or {},
        status=STATUS_ERROR, error=f"{LOAD_STAGE}: {reason}",
    )  # fmt: skip


def _read(uri: str, max_bytes: int) -> bytes | str:
    """The input's bytes, or the `[code] reason` of why it cannot be read."""
    try:
        return read_uri(uri, max_bytes)
    except InputError as e:
        return error_reason(e.code, str(e))
    except (OSError, ValueError) as e:  # pyarrow's and the OS's own errors
        return error_reason(ErrorCode.UNREADABLE, getattr(e, "strerror", None) or str(e))


def _normalised(s: Sample, raw: bytes, limits: LimitsConfig, video: VideoConfig, image_format: str) -> Sample:
    """normalise_input, any failure of it turned into this input's error row."""
    try:
        return normalise_input(s.uri, s.key, raw, limits, video, image_format)
    except MediaError as e:
        reason = error_reason(e.code, str(e))
    except Exception as e:  # a decoder bug on hostile bytes is still this input's failure only
        reason = error_reason(ErrorCode.CORRUPT, f"{type(e).__name__}: {e}")
    source = Source(uri=s.uri, sha256=s.key, bytes=len(raw), format="")
    return _error(s.uri, s.key, reason, Record(source=source))


def normalise_input(
    uri: str, key: str, raw: bytes, limits: LimitsConfig, video: VideoConfig, image_format: str = "jpg"
) -> Sample:
    """One input's bytes -> a sample ready for the stages (raises MediaError when unusable)."""
    source = Source(uri=uri, sha256=key, bytes=len(raw), format="")
    if is_video_uri(uri):
        ext = uri.rsplit(".", 1)[-1].lower()
        sampling = FrameSampling(fps=video.fps, stride=video.stride, max_frames=video.max_frames)
        bounds = VideoLimits(
            max_side=limits.max_side,
            max_pixels=limits.max_image_pixels,
            max_frames=limits.max_video_frames,
            max_seconds=limits.max_video_seconds,
            max_total_pixels=limits.max_video_pixels,
        )
        v = probe_video(
            raw,
            ext,
            keyframes=video.keyframes,
            sparse_frames=video.sparse_frames,
            sampling=sampling,
            limits=bounds,
        )
        source["format"] = ext
        media = {
            "type": "video", "ext": ext, "width": v.width, "height": v.height, "fps": v.fps,
            "num_frames": v.num_frames, "duration_s": round(v.duration_s, 4), "rotation": v.rotation,
            "sampling": {**dataclasses.asdict(sampling), "num_sampled": v.num_sampled},
        }  # fmt: skip
        record = new_record(key, source, media, [f"rotation-{v.rotation}"] if v.rotation else [])
        record["keyframes"] = [
            FrameRecord(frame_index=i, time_s=round(t, 4))
            for i, t in zip(v.keyframe_indices, v.keyframe_times, strict=True)
        ]
        record["sparse_frames"] = [
            {"frame_index": i, "time_s": round(t, 4)}
            for i, t in zip(v.sparse_indices, v.sparse_times, strict=True)
        ]
        return Sample(uri=uri, key=key, media_type="video", data=raw, frames=v.keyframes, record=record)
    im = normalise_image(
        raw, max_pixels=limits.max_image_pixels, max_side=limits.max_side, image_format=image_format
    )
    source["format"] = im.source_format.lower()
    media = {"type": "image", "ext": im.ext, "width": im.width, "height": im.height}
    record = new_record(key, source, media, im.steps)
    return Sample(uri=uri, key=key, media_type="image", data=im.data, frames=[], record=record)


def load_batch(
    batch: pa.Table, limits: LimitsConfig, video: VideoConfig, registry: Any, image_format: str = "jpg"
) -> pa.Table:
    """Ray map_batches function: {uri, failure} rows -> ROW_SCHEMA rows.

    `failure` is set for inputs already refused while listing (their row is that error). The URIs of
    all rows, and so of the index, the records and stage errors, are redacted (no credentials)."""
    max_bytes = limits.max_file_mb * 2**20
    failures = batch.column("failure").to_pylist() if "failure" in batch.column_names else None
    loaded: list[Loaded] = []
    for n, uri in enumerate(batch.column("uri").to_pylist()):
        start = time.perf_counter()
        shown = redact_uri(uri)
        raw = failures[n] if failures and failures[n] else _read(uri, max_bytes)
        if isinstance(raw, str):
            loaded.append(Loaded(_error(shown, None, raw), None))
            continue
        sample = Sample(uri=shown, key=content_key(raw), media_type="", data=b"", frames=[], record={})
        sample.timings[LOAD_STAGE] = time.perf_counter() - start
        loaded.append(Loaded(sample, raw))
    keyed = [item for item in loaded if item.raw is not None]
    owners = ray.get(registry.claim.remote([(i.sample.key, i.sample.uri) for i in keyed])) if keyed else []
    owner_of = iter(owners)
    out = []
    for item in loaded:
        s = item.sample
        if item.raw is None:
            out.append(s)
            continue
        owner = next(owner_of)
        if owner != s.uri:
            s.status, s.duplicate_of = STATUS_DUPLICATE, owner
            out.append(s)
            continue
        start = time.perf_counter()
        normalised = _normalised(s, item.raw, limits, video, image_format)
        normalised.timings[LOAD_STAGE] = s.timings[LOAD_STAGE] + time.perf_counter() - start
        out.append(normalised)
    return pa.Table.from_pylist([s.to_row() for s in out], schema=ROW_SCHEMA)
