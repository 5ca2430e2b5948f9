"""Decoding and normalising inputs: any valid image becomes upright 8-bit RGB; videos are probed and
their keyframes sampled with PyAV. Anything unreadable raises :class:`MediaError` with a reason that
ends up in the index row.
"""

from __future__ import annotations

import io
import warnings
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
    num_frames: int
    duration_s: float
    rotation: int
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


def normalise_image(data: bytes, *, max_pixels: int, max_side: int) -> NormalisedImage:
    """Bytes of any image file -> upright RGB, re-encoded only when something changed."""
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
    if not steps and fmt in ("JPEG", "PNG"):
        return NormalisedImage(data, "jpg" if fmt == "JPEG" else "png", im.width, im.height, fmt)
    lossy = fmt in ("JPEG", "MPO", "WEBP")
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if lossy else "PNG", **({"quality": 95} if lossy else {}))
    return NormalisedImage(buf.getvalue(), "jpg" if lossy else "png", im.width, im.height, fmt, steps)


def _evenly_spaced(n: int, k: int) -> list[int]:
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def _rotation(stream: av.video.stream.VideoStream) -> int:
    """Display rotation in degrees from the stream's side data or legacy metadata (0 if none)."""
    rotate = stream.metadata.get("rotate")
    return int(rotate) % 360 if rotate else 0


def _frames(data: bytes, stride: int, max_frames: int):
    """(index, time_s, av.VideoFrame) of the considered frames, decoded one at a time."""
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = 0
        for i, frame in enumerate(container.decode(stream)):
            if i % stride:
                continue
            if max_frames and index >= max_frames:
                break
            t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 1)
            yield index, t, frame
            index += 1


def _upright(frame: av.VideoFrame, rotation: int) -> Image.Image:
    im = frame.to_image()
    return im.rotate(-rotation, expand=True) if rotation else im


def probe_video(
    data: bytes, ext: str, *, keyframes: int, sparse_frames: int, stride: int = 1, max_frames: int = 0
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
            rotation = _rotation(stream)
        times = [t for _, t, _ in _frames(data, stride, max_frames)]
        n = len(times)
        if n == 0:
            raise MediaError("video has no decodable frames")
        dense = _evenly_spaced(n, keyframes)
        sparse = _evenly_spaced(n, sparse_frames)
        wanted = set(dense)
        images = []
        for index, _, frame in _frames(data, stride, max_frames):
            if index in wanted:
                buf = io.BytesIO()
                _upright(frame, rotation).save(buf, format="JPEG", quality=92)
                images.append(buf.getvalue())
            if index >= dense[-1]:
                break
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"unreadable video: {e}") from None
    if rotation in (90, 270):
        width, height = height, width
    return VideoSample(
        data=data,
        ext=ext,
        width=width,
        height=height,
        fps=fps,
        num_frames=n,
        duration_s=times[-1] - times[0] + (1.0 / fps if fps else 0.0),
        rotation=rotation,
        keyframe_indices=dense,
        keyframe_times=[times[i] for i in dense],
        keyframes=images,
        sparse_indices=sparse,
        sparse_times=[times[i] for i in sparse],
    )


def decode_rgb(data: bytes) -> Image.Image:
    """Stored (already normalised) image bytes -> RGB PIL image."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
