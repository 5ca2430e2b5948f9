"""Builders of odd, broken and hostile input files for the bad-input tests (real file formats)."""

from __future__ import annotations

import io
import tarfile
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from groundmill.pipeline.demo_data import write_shapes_video


def h264(frames: list[np.ndarray], times_ms: list[int], rotation: int = 0, fmt: str = "mp4") -> bytes:
    """An H.264 file with explicit per-frame timestamps and, optionally, a display rotation (CCW)."""
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for array, ms in zip(frames, times_ms, strict=True):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar at `path` holding `members` (name, bytes) as regular files, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(width: int = 96, height: int = 64) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


def rgb_jpeg(seed: int = 0) -> bytes:
    arr = gradient()
    arr[:8, :8] = (seed * 37) % 256  # distinct content -> distinct key
    return _save(Image.fromarray(arr), "JPEG", quality=95)


def cmyk_jpeg() -> bytes:
    return _save(Image.fromarray(gradient()).convert("CMYK"), "JPEG", quality=95)


def gray16_png() -> bytes:
    arr = (np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def grayscale_png() -> bytes:
    return _save(Image.fromarray(gradient()).convert("L"), "PNG")


def rgba_png() -> bytes:
    im = Image.fromarray(gradient()).convert("RGBA")
    im.putalpha(128)
    return _save(im, "PNG")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 96x64 stored image whose EXIF says 'rotate 90 CW': upright it is 64x96."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(gradient()), "JPEG", exif=exif.tobytes())


def very_wide_png() -> bytes:
    return _save(Image.fromarray(gradient(6000, 20)), "PNG")


def awkward_images() -> dict[str, bytes]:
    """Odd but valid pictures every stage must annotate: extreme aspect ratios, a 1-pixel side, a
    single pixel, 16-bit, CMYK, grayscale, alpha, EXIF-rotated."""
    return {
        "wide_4000x12": _save(Image.fromarray(gradient(4000, 12)), "PNG"),
        "tall_9x2500": _save(Image.fromarray(gradient(9, 2500)), "PNG"),
        "one_pixel_high_300x1": _save(Image.fromarray(gradient(300, 1)), "PNG"),
        "one_pixel_wide_1x200": _save(Image.fromarray(gradient(1, 200)), "PNG"),
        "single_pixel": _save(Image.fromarray(gradient(1, 1)), "PNG"),
        "gray16": gray16_png(),
        "cmyk": cmyk_jpeg(),
        "grayscale": grayscale_png(),
        "rgba": rgba_png(),
        "exif_rotated": exif_rotated_jpeg(),
    }


def truncated_jpeg() -> bytes:
    data = rgb_jpeg(99)
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    """A valid PNG header and chunk layout whose compressed pixel data is garbage."""
    data = bytearray(grayscale_png())
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(range(64))
    return bytes(data)


def decompression_bomb_png(side: int = 30_000) -> bytes:
    """A valid PNG header claiming side x side pixels (900 MP) in a few hundred bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_inputs(folder: Path) -> dict[str, str]:
    """A folder of every kind of input; returns {file name: expected status}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "good_a.jpg": (rgb_jpeg(1), "ok"),
        "good_b.jpg": (rgb_jpeg(2), "ok"),
        "copy_of_a.jpg": (rgb_jpeg(1), "ok"),  # duplicate content: annotated once
        "cmyk.jpg": (cmyk_jpeg(), "ok"),
        "gray16.png": (gray16_png(), "ok"),
        "gray.png": (grayscale_png(), "ok"),
        "rgba.png": (rgba_png(), "ok"),
        "rotated.jpg": (exif_rotated_jpeg(), "ok"),
        "wide.png": (very_wide_png(), "ok"),
        "empty.jpg": (b"", "error"),
        "truncated.jpg": (truncated_jpeg(), "error"),
        "corrupt.png": (corrupt_png(), "error"),
        "notes.txt": (b"this is not an image", "error"),
        "bomb.png": (decompression_bomb_png(), "error"),
        "broken.mp4": (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "error"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    write_shapes_video(folder / "clip.mp4", num_frames=12, size=(96, 64))
    expected = {name: status for name, (_, status) in files.items()}
    expected["clip.mp4"] = "ok"
    return expected
