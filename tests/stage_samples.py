"""Samples and stage builders shared by the stage tests: small images, a two-keyframe video sample,
and a stage built from its registry name with validated params."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from groundmill.pipeline.config import stage_params
from groundmill.schema import new_record
from groundmill.stages import stage_class
from groundmill.stages.base import ModelSpec, Resources, Sample


def png(seed: int, size=(96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[10:50, 20:60] = (200, 30, 30)  # a red block
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def image_sample(seed: int, size=(96, 72)) -> Sample:
    data = png(seed, size)
    key = f"{seed:016x}"
    media = {"type": "image", "ext": "png", "width": size[0], "height": size[1]}
    record = new_record(key, {"uri": key, "sha256": "", "bytes": len(data), "format": "PNG"}, media, [])
    return Sample(uri=key, key=key, media_type="image", data=data, frames=[], record=record)


def video_sample() -> Sample:
    frames = [png(10), png(11)]
    media = {"type": "video", "ext": "mp4", "width": 96, "height": 72}
    record = new_record("f" * 16, {"uri": "v", "sha256": "", "bytes": 0, "format": "mp4"}, media, [])
    record["keyframes"] = [{"frame_index": 0, "time_s": 0.0}, {"frame_index": 5, "time_s": 0.2}]
    return Sample(uri="v", key="f" * 16, media_type="video", data=b"", frames=frames, record=record)


def build(name, params, model_id, stage_id=None):
    cls = stage_class(name)
    return cls(
        stage_params(cls, params, name), ModelSpec(id=model_id), Resources(), seed=0, stage_id=stage_id
    )
