"""Trust, media: decoders meet allowlists and limits first, and memory stays bounded by the limits
(issue 16, findings 12 and 13): image formats and video demuxers are allowlisted, the pixel limit is
weighted by bytes per sample, videos are bounded in side, pixels, frames and duration, and the
trainer decodes only the frames a record annotates."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from groundmill.media import MediaError, VideoLimits, normalise_image, probe_video
from groundmill.model.records import load
from groundmill.pipeline.config import LimitsConfig, VideoConfig
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.pipeline.load import normalise_input
from groundmill.schema import ErrorCode, content_key
from groundmill.tests import media_factory as mf

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"max_pixels": 100_000_000, "max_side": 4096}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


def _ppm() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mf.gradient()).save(buf, format="PPM")
    return buf.getvalue()


def test_only_allowlisted_image_formats_are_decoded(monkeypatch):
    tried = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: tried.append("eps"))
    for data in (EPS, _ppm()):  # PPM decodes fine in Pillow: refused here by name, not by failure
        with pytest.raises(MediaError, match="not a recognised image format") as e:
            normalise_image(data, **LIMITS)
        assert e.value.code == ErrorCode.UNSUPPORTED_FORMAT
    assert tried == [], "Pillow's EPS plugin (Ghostscript) was tried on an input"


def test_sixteen_bit_images_count_twice_against_the_pixel_limit():
    data = mf.gray16_png()  # 96 x 64 = 6144 pixels, 2 bytes per sample
    assert normalise_image(data, max_pixels=96 * 64 * 2, max_side=4096).width == 96
    with pytest.raises(MediaError, match="bytes per sample") as e:
        normalise_image(data, max_pixels=96 * 64 * 2 - 1, max_side=4096)
    assert e.value.code == ErrorCode.BOMB
    eight_bit = mf.grayscale_png()
    assert normalise_image(eight_bit, max_pixels=96 * 64, max_side=4096).width == 96


def test_normalising_a_sixteen_bit_image_costs_a_few_bytes_per_pixel(tmp_path):
    """Peak memory (RSS) of normalising a 12 Mpx 16-bit PNG, in a fresh process; the float64 path it
    replaces cost about 26 bytes per pixel (1.27 GB at 50 Mpx)."""
    width, height = 4000, 3000
    ramp = (np.arange(width * height, dtype=np.uint32) % 65536).astype(np.uint16).reshape(height, width)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    script = (  # VmHWM: this process's peak RSS (ru_maxrss would carry over pytest's own, across exec)
        "import re, sys\n"
        "from pathlib import Path\n"
        "from groundmill.media import normalise_image\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1])\n"
        "data = Path(sys.argv[1]).read_bytes()\n"
        "before = peak()\n"
        "out = normalise_image(data, max_pixels=10**9, max_side=10**6)\n"
        "print((peak() - before) * 1024, out.width, out.height)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "g16.png")], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    peak, w, h = map(int, result.stdout.split())
    assert (w, h) == (width, height)
    per_pixel = peak / (width * height)
    print(f"\n16-bit {width}x{height}: {per_pixel:.1f} bytes per pixel at peak")
    assert per_pixel < 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    return write_shapes_video(path, num_frames=12, size=(96, 64), fps=10).read_bytes()


@pytest.mark.parametrize(
    ("limits", "code", "reason"),
    [
        (VideoLimits(max_side=80), ErrorCode.TOO_LARGE, "max_side"),
        (VideoLimits(max_pixels=96 * 64 - 1), ErrorCode.BOMB, "max_image_pixels"),
        (VideoLimits(max_frames=8), ErrorCode.TOO_LARGE, "max_video_frames"),
        (VideoLimits(max_seconds=0.5), ErrorCode.TOO_LARGE, "max_video_seconds"),
        (VideoLimits(max_total_pixels=96 * 64 * 6), ErrorCode.BOMB, "max_video_pixels"),
    ],
)
def test_videos_are_bounded_in_side_pixels_frames_and_duration(clip, limits, code, reason):
    assert probe_video(clip, "mp4", keyframes=2, sparse_frames=2).num_frames == 12
    with pytest.raises(MediaError, match=reason) as e:
        probe_video(clip, "mp4", keyframes=2, sparse_frames=2, limits=limits)
    assert e.value.code == code


def test_the_run_limits_apply_to_videos(clip):
    """The run's image limits reach videos: a 96x64 clip over max_side 80 is refused, not stored."""
    limits = LimitsConfig(max_side=80)
    with pytest.raises(MediaError, match="max_side"):
        normalise_input("clip.mp4", content_key(clip), clip, limits, VideoConfig())
    with pytest.raises(MediaError, match="max_video_frames"):
        normalise_input("clip.mp4", content_key(clip), clip, LimitsConfig(max_video_frames=5), VideoConfig())


def test_a_concat_script_named_mp4_reads_no_other_file(tmp_path, monkeypatch, clip):
    (tmp_path / "other.mp4").write_bytes(clip)
    monkeypatch.chdir(tmp_path)  # ffconcat resolves its files relative to the working directory
    script = b"ffconcat version 1.0\nfile other.mp4\n"
    with pytest.raises(MediaError, match="not an allowed video container") as e:
        probe_video(script, "mp4", keyframes=2, sparse_frames=2)
    assert e.value.code == ErrorCode.UNSUPPORTED_FORMAT


def test_the_trainer_decodes_only_the_frames_it_samples(clip, monkeypatch):
    """A video sample holds no frames until a task asks for some; then only those are kept, each at
    training size, and decoding stops after the last one asked for."""
    import groundmill.model.records as records

    record = {
        "schema_version": 2,
        "media": {"type": "video", "ext": "mp4", "rotation": 0, "width": 96, "height": 64, "num_frames": 12},
    }
    yielded = []
    real = records.video_frames

    def counting(data, rotation, indices=None):
        for index, im in real(data, rotation, indices):
            yielded.append(index)
            yield index, im

    monkeypatch.setattr(records, "video_frames", counting)
    _, frames = load({"json": json.dumps(record).encode(), "mp4": clip}, 32)
    assert len(frames) == 12 and yielded == []  # the length comes from the record: nothing decoded
    taken = frames.take([3, 6, 3])
    assert yielded == [3, 6] and [f.shape for f in taken] == [(32, 32, 3)] * 3
    assert np.array_equal(taken[0], taken[2])
