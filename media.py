"""The one place that turns bytes into pixels (foundation: imports nothing of groundmill).

Decoding and normalising inputs: any valid image becomes upright 8-bit RGB; videos are probed and
their keyframes sampled with PyAV. Anything unreadable raises :class:`MediaError` with a reason that
ends up in the index row.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg"}
# Our own bomb check runs before decoding, with the limit from the config; PIL's global one is off.
Image.MAX_IMAGE_PIXELS = None


class MediaError(Exception):
    """The input cannot be used; `str(e)` is the reason recorded in the index."""


@dataclass
class NormalisedImage:
    data: bytes  # what the shard stores
    ext: str  # "jpg" | "png"
    width: int
    height: int
    source_format: str
    steps: list[str] = field(default_factory=list)  # what normalisation did, for the record


@dataclass
class VideoSample:
    data: bytes  # the original file, stored as is
    ext: str
    width: int
    height: int
    fps: float
    num_frames: int  # decoded frames (up to the last one sampling kept)
    num_sampled: int  # frames sampling kept
    duration_s: float
    rotation: int  # clockwise display rotation; frames and sizes here are upright
    keyframe_indices: list[int]  # dense frames the image stages annotate
    keyframe_times: list[float]
    keyframes: list[bytes]  # JPEG bytes of those frames, upright
    sparse_indices: list[int]
    sparse_times: list[float]


def is_video_uri(uri: str) -> bool:
    return PurePosixPath(uri.lower()).suffix in VIDEO_EXTENSIONS


def _to_rgb(im: Image.Image, steps: list[str]) -> Image.Image:
    """Any PIL mode -> RGB, scaling high bit depths rather than clipping them."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        steps.append(f"{mode}->8bit")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
        steps.append(f"{mode}->composited-on-white")
    elif im.mode != "RGB":
        steps.append(f"{im.mode}->RGB")
    return im.convert("RGB")


IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}  # stored image extension -> PIL format


def normalise_image(
    data: bytes, *, max_pixels: int, max_side: int, image_format: str = "jpg"
) -> NormalisedImage:
    """Bytes of any image file -> upright RGB in `image_format` ("jpg" or "png"), so every image shard
    holds one extension; re-encoded only when something changed or the format differs."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {sorted(IMAGE_FORMATS)}")
    if not data:
        raise MediaError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            if im.width * im.height > max_pixels:
                raise MediaError(
                    f"decompression bomb: {im.width}x{im.height} = {im.width * im.height} pixels "
                    f"> limits.max_image_pixels {max_pixels}"
                )
            steps: list[str] = []
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                im.seek(0)
                steps.append(f"first-frame-of-{n_frames}")
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            if orientation not in (1, None):
                im = ImageOps.exif_transpose(im)
                steps.append(f"exif-orientation-{orientation}")
            im = _to_rgb(im, steps)
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"corrupt or truncated image: {e}") from None
    if im.width == 0 or im.height == 0:
        raise MediaError("image has zero width or height")
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
        steps.append(f"downscaled-to-{size[0]}x{size[1]}")
    target = IMAGE_FORMATS[image_format]
    if not steps and fmt == target:
        return NormalisedImage(data, image_format, im.width, im.height, fmt)
    if fmt != target:
        steps.append(f"{fmt}->{target}")
    buf = io.BytesIO()
    im.save(buf, format=target, **({"quality": 95} if target == "JPEG" else {}))
    return NormalisedImage(buf.getvalue(), image_format, im.width, im.height, fmt, steps)


def _evenly_spaced(n: int, k: int) -> list[int]:
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


@dataclass(frozen=True)
class FrameSampling:
    """Which decoded frames a run considers; the same rule for keyframe sampling and for tracking."""

    fps: float = 0.0  # > 0: at most one frame per 1/fps seconds of timestamps (variable frame rate safe)
    stride: int = 1  # then every n-th of those
    max_frames: int = 0  # then at most this many (0: no cap)


def frame_rotation(frame: av.VideoFrame) -> int:
    """Clockwise display rotation in degrees (0, 90, 180 or 270) from the frame's display matrix."""
    return round(-frame.rotation / 90) * 90 % 360  # PyAV reports the counter-clockwise angle


def upright(frame: av.VideoFrame, rotation: int) -> Image.Image:
    """The frame as displayed: `rotation` is the clockwise display rotation."""
    im = frame.to_image()
    return im.rotate(-rotation, expand=True) if rotation else im


def sampled_frames(data: bytes, sampling: FrameSampling) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """(frame_index, time_s, frame) of the frames `sampling` keeps, decoded one at a time.

    frame_index counts every decoded frame in presentation order (the index trainers decode to);
    time_s comes from the frame's own timestamp, so variable frame rates are sampled by time.
    """
    if sampling.stride < 1 or sampling.fps < 0 or sampling.max_frames < 0:
        raise ValueError(f"bad frame sampling {sampling}")
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 1)
        last_slot, candidates, kept = None, 0, 0
        for index, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else index / rate
            if sampling.fps > 0:
                slot = int(t * sampling.fps + 1e-6)  # one frame per 1/fps-second slot
                if slot == last_slot:
                    continue
                last_slot = slot
            candidates += 1
            if (candidates - 1) % sampling.stride:
                continue
            if sampling.max_frames and kept >= sampling.max_frames:
                break
            kept += 1
            yield index, t, frame


def video_frames(
    data: bytes, rotation: int, indices: set[int] | None = None
) -> Iterator[tuple[int, Image.Image]]:
    """(frame_index, upright RGB image) of every decoded frame, or only of `indices` (decoding stops
    after the last one). `rotation` is the record's clockwise display rotation (`media.rotation`)."""
    last = max(indices) if indices else None
    for index, _, frame in sampled_frames(data, FrameSampling()):
        if indices is None or index in indices:
            yield index, upright(frame, rotation).convert("RGB")
        if last is not None and index >= last:
            return


def probe_video(
    data: bytes, ext: str, *, keyframes: int, sparse_frames: int, sampling: FrameSampling = FrameSampling()
) -> VideoSample:
    """Probe a video and sample its dense keyframes (JPEG) and sparse frame times, in bounded memory.

    Two decoding passes (count, then select) keep memory to one frame at a time whatever the length.
    """
    if not data:
        raise MediaError("empty file")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or 0.0)
        considered: list[tuple[int, float]] = []
        rotation, decoded = 0, 0
        for index, t, frame in sampled_frames(data, sampling):
            if not considered:
                rotation = frame_rotation(frame)
            considered.append((index, t))
            decoded = index + 1
        n = len(considered)
        if n == 0:
            raise MediaError("video has no decodable frames")
        dense = [considered[i] for i in _evenly_spaced(n, keyframes)]
        sparse = [considered[i] for i in _evenly_spaced(n, sparse_frames)]
        wanted = {index for index, _ in dense}
        images = []
        for index, _, frame in sampled_frames(data, sampling):
            if index in wanted:
                buf = io.BytesIO()
                upright(frame, rotation).save(buf, format="JPEG", quality=92)
                images.append(buf.getvalue())
            if index >= dense[-1][0]:
                break
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"unreadable video: {e}") from None
    if rotation in (90, 270):
        width, height = height, width
    times = [t for _, t in considered]
    return VideoSample(
        data=data,
        ext=ext,
        width=width,
        height=height,
        fps=fps,
        num_frames=decoded,
        num_sampled=n,
        duration_s=times[-1] - times[0] + (1.0 / fps if fps else 0.0),
        rotation=rotation,
        keyframe_indices=[i for i, _ in dense],
        keyframe_times=[t for _, t in dense],
        keyframes=images,
        sparse_indices=[i for i, _ in sparse],
        sparse_times=[t for _, t in sparse],
    )


def decode_rgb(data: bytes) -> Image.Image:
    """Stored (already normalised) image bytes -> RGB PIL image."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
