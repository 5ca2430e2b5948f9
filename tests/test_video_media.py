"""Video decoding and frame sampling: timestamps (variable frame rate), fps / stride / max_frames, display
rotation, and files with no usable frames."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from groundmill.media import FrameSampling, MediaError, probe_video, sampled_frames
from groundmill.pipeline.config import ConfigError, load_config
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.tests.media_factory import h264 as encode

VFR_MS = [0, 40, 80, 300, 340, 1000, 1040, 1500]  # irregular presentation times


def blank(n: int, height: int = 32, width: int = 64) -> list[np.ndarray]:
    return [np.full((height, width, 3), 10 * i, dtype=np.uint8) for i in range(n)]


def kept(data: bytes, **sampling) -> list[tuple[int, float]]:
    return [(i, round(t, 3)) for i, t, _ in sampled_frames(data, FrameSampling(**sampling))]


def test_variable_frame_rate_keeps_real_timestamps_and_samples_by_time():
    data = encode(blank(len(VFR_MS)), VFR_MS)
    assert kept(data) == [(i, ms / 1000) for i, ms in enumerate(VFR_MS)]
    # 4 fps: one frame per 0.25 s slot of presentation time, whatever the spacing of the frames.
    assert kept(data, fps=4) == [(0, 0.0), (3, 0.3), (5, 1.0), (7, 1.5)]


def test_stride_and_max_frames_keep_decoded_stream_indices(tmp_path):
    data = write_shapes_video(tmp_path / "v.mp4", num_frames=12, size=(64, 48)).read_bytes()
    assert [i for i, _ in kept(data, stride=3)] == [0, 3, 6, 9]
    assert [i for i, _ in kept(data, stride=2, max_frames=3)] == [0, 2, 4]
    v = probe_video(data, "mp4", keyframes=2, sparse_frames=3, sampling=FrameSampling(stride=3))
    # frame_index is the index in the decoded stream (what trainers decode to), not in the sample.
    assert v.keyframe_indices == [0, 9] and v.sparse_indices == [0, 6, 9]
    assert (v.num_frames, v.num_sampled) == (10, 4)


def test_display_rotation_makes_frames_upright():
    frames = blank(3)
    for f in frames:
        f[:, :8] = 255  # a white band on the stored frame's left edge
    data = encode(frames, [0, 40, 80], rotation=90)  # display: turn 90 degrees counter-clockwise
    v = probe_video(data, "mp4", keyframes=1, sparse_frames=1)
    assert v.rotation == 270  # clockwise convention, like the legacy `rotate` tag
    assert (v.width, v.height) == (32, 64)
    upright = np.asarray(Image.open(io.BytesIO(v.keyframes[0])).convert("L"))
    assert upright.shape == (64, 32)
    assert upright[-6:].mean() > 200 and upright[:-10].mean() < 80  # the band is now at the bottom


def test_files_without_usable_frames_raise_media_error():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        container.start_encoding()  # a header, then no frames at all
    with pytest.raises(MediaError):
        probe_video(buf.getvalue(), "mkv", keyframes=2, sparse_frames=2)
    good = encode(blank(6), [0, 40, 80, 120, 160, 200])
    with pytest.raises(MediaError):
        probe_video(good[: len(good) // 3], "mp4", keyframes=2, sparse_frames=2)


def test_bad_video_sampling_config_fails_naming_the_key():
    with pytest.raises(ConfigError, match="video.stride"):
        load_config(None, ["inputs=[x]", "video.stride=0"])
    with pytest.raises(ConfigError, match="video.fps"):
        load_config(None, ["inputs=[x]", "video.fps=-1"])
