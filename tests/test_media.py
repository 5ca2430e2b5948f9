import io

import numpy as np
import pytest
from PIL import Image

from groundmill.media import MediaError, normalise_image, probe_video
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.tests import media_factory as mf

LIMITS = {"max_pixels": 100_000_000, "max_side": 4096}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_plain_jpeg_is_stored_unchanged():
    data = mf.rgb_jpeg()
    out = normalise_image(data, **LIMITS)
    assert out.data == data and out.ext == "jpg" and out.steps == []
    assert (out.width, out.height) == (96, 64)


@pytest.mark.parametrize(
    ("make", "step"),
    [
        (mf.cmyk_jpeg, "CMYK->RGB"),
        (mf.grayscale_png, "L->RGB"),
        (mf.gray16_png, "I;16->8bit"),
        (mf.rgba_png, "RGBA->composited-on-white"),
    ],
)
def test_odd_modes_become_rgb(make, step):
    out = normalise_image(make(), **LIMITS)
    im = Image.open(io.BytesIO(out.data))
    assert im.mode == "RGB" and im.size == (96, 64)
    assert step in out.steps


def test_sixteen_bit_is_scaled_not_clipped():
    out = normalise_image(mf.gray16_png(), **LIMITS)
    gray = _pixels(out.data)[..., 0]
    # The 16-bit ramp spans 0..65535: scaled it spans ~0..255 with many levels; clipped it would be all 255.
    assert gray.min() <= 2 and gray.max() >= 253 and len(np.unique(gray)) > 200


def test_exif_orientation_is_applied():
    out = normalise_image(mf.exif_rotated_jpeg(6), **LIMITS)
    assert (out.width, out.height) == (64, 96)
    assert "exif-orientation-6" in out.steps
    assert Image.open(io.BytesIO(out.data)).getexif().get(0x0112) is None


def test_very_wide_image_is_downscaled_keeping_aspect():
    out = normalise_image(mf.very_wide_png(), **LIMITS)
    assert out.width == 4096 and out.height == round(20 * 4096 / 6000)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not a recognised image format"),
        (mf.truncated_jpeg(), "corrupt or truncated"),
        (mf.corrupt_png(), "corrupt or truncated"),
        (mf.decompression_bomb_png(), "decompression bomb"),
    ],
)
def test_bad_images_raise_with_reason(data, reason):
    with pytest.raises(MediaError, match=reason):
        normalise_image(data, **LIMITS)


def test_video_probe_samples_dense_and_sparse_frames(tmp_path):
    path = write_shapes_video(tmp_path / "v.mp4", num_frames=20, size=(96, 64), fps=10)
    v = probe_video(path.read_bytes(), "mp4", keyframes=4, sparse_frames=8)
    assert (v.width, v.height, v.num_frames) == (96, 64, 20)
    assert v.keyframe_indices == [0, 6, 13, 19] and len(v.keyframes) == 4
    assert len(v.sparse_indices) == 8 and v.sparse_times == sorted(v.sparse_times)
    assert Image.open(io.BytesIO(v.keyframes[0])).size == (96, 64)
    assert v.fps == pytest.approx(10.0)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, b"garbage" * 50])
def test_unreadable_video_raises(data):
    with pytest.raises(MediaError):
        probe_video(data, "mp4", keyframes=4, sparse_frames=8)


def test_pad_to_aspect_keeps_pixels_in_place():
    from PIL import Image

    from groundmill.media import pad_to_aspect

    wide = Image.new("RGB", (400, 10), (255, 0, 0))
    padded = pad_to_aspect(wide, 8)
    assert padded.size == (400, 50) and padded.getpixel((399, 9)) == (255, 0, 0)
    assert padded.getpixel((0, 10)) == (0, 0, 0)
    tall = pad_to_aspect(Image.new("L", (1, 300), 7), 3)
    assert tall.size == (100, 300) and tall.getpixel((0, 299)) == 7
    square = Image.new("RGB", (30, 20))
    assert pad_to_aspect(square, 2) is square  # within the ratio: unchanged
