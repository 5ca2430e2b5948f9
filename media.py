"""The one place that turns bytes into pixels (foundation: imports nothing of groundmill).

Decoding and normalising inputs: any valid image becomes upright 8-bit RGB; videos are probed and
their keyframes sampled with PyAV. Anything unreadable raises :class:`MediaError` with a reason and
an :class:`~groundmill.schema.ErrorCode` that end up in the index row.

Hostile bytes meet allowlists and limits before any decoder runs: only the image formats of
:data:`IMAGE_FORMATS` are tried (Pillow would otherwise try every plugin, EPS calling Ghostscript),
only the demuxers of :data:`VIDEO_DEMUXERS` open a video (no concat scripts or playlists that read
other files), an image's pixel limit is weighted by its bytes per sample, and videos are bounded in
side, pixels, frames and duration (:class:`VideoLimits`).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from groundmill.schema import ErrorCode

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg"}
# Our own bomb check runs before decoding, with the limit from the config; PIL's global one is off.
Image.MAX_IMAGE_PIXELS = None
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # Pillow plugins tried (JPEG also opens MPO)
# FFmpeg demuxer names (format_whitelist): containers that never open another file or URL.
VIDEO_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpeg,mpegts"
_EINVAL = 22  # what avformat_open_input returns for a demuxer outside the whitelist
# Bytes per sample of high-depth modes: the pixel limit counts such an image this many times over.
_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}


class MediaError(Exception):
    """The input cannot be used; `str(e)` is the reason recorded in the index, `code` its ErrorCode."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.CORRUPT):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class VideoLimits:
    """What a video may cost to decode; the stored file is kept as is, so larger ones are refused."""

    max_side: int = 4096
    max_pixels: int = 100_000_000  # per frame
    max_frames: int = 18_000  # decoded frames
    max_seconds: float = 1800.0
    max_total_pixels: int = 40_000_000_000  # frames x width x height: bounds the decoding work


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
    if mode in _SAMPLE_BYTES:
        im = _to_8bit(im)
        steps.append(f"{mode}->8bit")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
        steps.append(f"{mode}->composited-on-white")
    elif im.mode != "RGB":
        steps.append(f"{im.mode}->RGB")
    return im.convert("RGB")


def _to_8bit(im: Image.Image, chunk_pixels: int = 2**20) -> Image.Image:
    """A 16/32-bit single-channel image -> 8-bit "L", scaled (not clipped), in row chunks so the
    float working copy stays a few MB whatever the image size."""
    arr = np.asarray(im)
    hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, chunk_pixels // max(1, arr.shape[1]))
    for r in range(0, arr.shape[0], rows):
        out[r : r + rows] = np.clip(arr[r : r + rows].astype(np.float32) * (255.0 / hi) + 0.5, 0, 255)
    return Image.fromarray(out, "L")


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    """Refuse before decoding: pixels weighted by bytes per sample (a 16-bit image counts twice)."""
    weight = _SAMPLE_BYTES.get(im.mode, 1)
    cost = im.width * im.height * weight
    if cost > max_pixels:
        depth = f" x {weight} (bytes per sample of mode {im.mode})" if weight > 1 else ""
        raise MediaError(
            f"decompression bomb: {im.width}x{im.height} = {im.width * im.height} pixels{depth} "
            f"> limits.max_image_pixels {max_pixels}",
            ErrorCode.BOMB,
        )


STORED_FORMATS = {"jpg": "JPEG", "png": "PNG"}  # stored image extension -> PIL format


def normalise_image(
    data: bytes, *, max_pixels: int, max_side: int, image_format: str = "jpg"
) -> NormalisedImage:
    """Bytes of any image file -> upright RGB in `image_format` ("jpg" or "png"), so every image shard
    holds one extension; re-encoded only when something changed or the format differs."""
    if image_format not in STORED_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {sorted(STORED_FORMATS)}")
    if not data:
        raise MediaError("empty file", ErrorCode.EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            fmt = im.format or "unknown"
            _check_pixels(im, max_pixels)
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
        raise MediaError(
            f"not a recognised image format (allowed: {', '.join(IMAGE_FORMATS)})",
            ErrorCode.UNSUPPORTED_FORMAT,
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"corrupt or truncated image: {e}", ErrorCode.CORRUPT) from None
    if im.width == 0 or im.height == 0:
        raise MediaError("image has zero width or height")
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
        steps.append(f"downscaled-to-{size[0]}x{size[1]}")
    target = STORED_FORMATS[image_format]
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


def open_video(data: bytes) -> av.container.InputContainer:
    """A PyAV container over the bytes, opened only by an allowlisted demuxer (VIDEO_DEMUXERS)."""
    try:
        return av.open(io.BytesIO(data), mode="r", options={"format_whitelist": VIDEO_DEMUXERS})
    except av.error.FFmpegError as e:
        if e.errno == _EINVAL:
            raise MediaError(
                f"not an allowed video container (allowed demuxers: {VIDEO_DEMUXERS})",
                ErrorCode.UNSUPPORTED_FORMAT,
            ) from None
        raise


def sampled_frames(data: bytes, sampling: FrameSampling) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """(frame_index, time_s, frame) of the frames `sampling` keeps, decoded one at a time.

    frame_index counts every decoded frame in presentation order (the index trainers decode to);
    time_s comes from the frame's own timestamp, so variable frame rates are sampled by time.
    """
    if sampling.stride < 1 or sampling.fps < 0 or sampling.max_frames < 0:
        raise ValueError(f"bad frame sampling {sampling}")
    with open_video(data) as container:
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


def _check_video_header(stream: av.video.stream.VideoStream, limits: VideoLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if max(width, height) > limits.max_side:
        raise MediaError(
            f"video is {width}x{height}: a side > limits.max_side {limits.max_side}", ErrorCode.TOO_LARGE
        )
    if width * height > limits.max_pixels:
        raise MediaError(
            f"video frames are {width}x{height} > limits.max_image_pixels {limits.max_pixels}", ErrorCode.BOMB
        )
    declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if declared > limits.max_seconds:
        raise MediaError(
            f"video lasts {declared:.0f} s > limits.max_video_seconds {limits.max_seconds:g}",
            ErrorCode.TOO_LARGE,
        )


def _check_video_frame(index: int, t: float, frame: av.VideoFrame, limits: VideoLimits) -> None:
    """Limits on what decoding found (headers can lie): size, frame count, time, total pixels."""
    pixels = frame.width * frame.height
    if max(frame.width, frame.height) > limits.max_side or pixels > limits.max_pixels:
        raise MediaError(f"video frame {index} is {frame.width}x{frame.height}: over limits", ErrorCode.BOMB)
    if index + 1 > limits.max_frames:
        raise MediaError(
            f"video has more than limits.max_video_frames {limits.max_frames} frames", ErrorCode.TOO_LARGE
        )
    if t > limits.max_seconds:
        raise MediaError(
            f"video runs past limits.max_video_seconds {limits.max_seconds:g} s", ErrorCode.TOO_LARGE
        )
    if (index + 1) * pixels > limits.max_total_pixels:
        raise MediaError(
            f"video decodes to more than limits.max_video_pixels {limits.max_total_pixels} pixels",
            ErrorCode.BOMB,
        )


def probe_video(
    data: bytes,
    ext: str,
    *,
    keyframes: int,
    sparse_frames: int,
    sampling: FrameSampling = FrameSampling(),
    limits: VideoLimits = VideoLimits(),
) -> VideoSample:
    """Probe a video and sample its dense keyframes (JPEG) and sparse frame times, in bounded memory.

    Two decoding passes (count, then select) keep memory to one frame at a time whatever the length;
    `limits` are checked on the header, then on every frame the count pass decodes.
    """
    if not data:
        raise MediaError("empty file", ErrorCode.EMPTY)
    try:
        with open_video(data) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            _check_video_header(stream, limits)
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or 0.0)
        considered: list[tuple[int, float]] = []
        rotation, decoded = 0, 0
        for index, t, frame in sampled_frames(data, sampling):
            _check_video_frame(index, t, frame, limits)
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


def pad_to_aspect(im: Image.Image, max_aspect: float, min_side: int = 1) -> Image.Image:
    """`im` padded with black on the right and bottom so that its long side is at most `max_aspect`
    times its short side and both sides are at least `min_side` (unchanged when it already is). Pixel
    coordinates inside `im` stay the same, so a model's boxes or maps over the padded picture crop back
    to `im` by clipping."""
    w, h = im.size
    long_side = max(w, h, min_side)
    size = (
        max(w, min_side, math.ceil(long_side / max_aspect)),
        max(h, min_side, math.ceil(long_side / max_aspect)),
    )
    if size == (w, h):
        return im
    padded = Image.new(im.mode, size)
    padded.paste(im, (0, 0))
    return padded


def decode_rgb(data: bytes) -> Image.Image:
    """Stored (already normalised) image bytes -> RGB PIL image."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
