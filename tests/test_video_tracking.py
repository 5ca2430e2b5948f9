"""Video tracking: chunked propagation, discovery of objects that enter mid-clip, masklets that decode to
the frame size, bounded memory, and the stage inside a real Ray run.

Two propagators are used: `ColourPropagatorDouble`, a test double that follows a prompt's colour (so the
chunking / discovery / track-book logic is checked against known answers), and the real sam2 video
predictor (tiny random weights at a small input size), whose masks are arbitrary but must flow through
the same bookkeeping intact.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from groundmill.benchmarks.bench_tracking import PeakRss, colour_mask, run_once, shapes_detections
from groundmill.pipeline.config import LimitsConfig, VideoConfig, load_config
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.pipeline.load import normalise_input
from groundmill.pipeline.run import run_pipeline
from groundmill.schema import check_record, decode_mask, encode_mask
from groundmill.shards import SHARDS_DIR, read_index
from groundmill.stages.base import ModelSpec, Resources
from groundmill.stages.tracking import (
    Detection,
    Sam2Propagator,
    Sam2Tracking,
    frame_chunks,
    keyframe_detections,
    track_video,
    video_frames,
)

SIZE = (160, 120)  # the demo video's size: red disc, blue square, green disc entering at frame 12


class ColourPropagatorDouble:
    """Test double for SAM2: a prompt's median colour, thresholded on every frame of the chunk."""

    def __init__(self):
        self.calls: list[tuple[int, dict[int, int]]] = []

    def propagate(self, frames, prompts):
        self.calls.append((len(frames), {tid: frame for tid, (frame, _) in prompts.items()}))
        arrays = [np.asarray(f) for f in frames]
        colours = {tid: np.median(arrays[frame][mask], axis=0) for tid, (frame, mask) in prompts.items()}
        return {n: {tid: colour_mask(a, c) for tid, c in colours.items()} for n, a in enumerate(arrays)}


def video_sample(path: Path, keyframes: int, **video):
    data = path.read_bytes()
    return normalise_input(
        str(path), "0" * 24, data, LimitsConfig(), VideoConfig(keyframes=keyframes, **video)
    )


def add_shape_objects(sample) -> None:
    """Hand-built keyframe objects: the shapes visible on each keyframe, as detection + mask stages would."""
    indices = [k["frame_index"] for k in sample.record["keyframes"]]
    found = shapes_detections(sample.data, indices)
    for k in sample.record["keyframes"]:
        k["objects"] = [
            {"id": d.origin["object_id"], "bbox": [0, 0, 1, 1], "labels": d.labels, "attributes": [],
             "score": 0.9, "detectors": ["hand-built"], "segmentation": encode_mask(d.mask)}
            for d in found[k["frame_index"]]
        ]  # fmt: skip


def detections(sample):
    media = sample.record["media"]
    return keyframe_detections(sample.record, 0.0, media["height"], media["width"])


def test_chunks_share_one_frame_and_keep_a_lone_frame():
    items = [(i, i / 8, None) for i in range(7)]
    assert [[i for i, _, _ in c] for c in frame_chunks(iter(items), 3)] == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert [[i for i, _, _ in c] for c in frame_chunks(iter(items[:1]), 3)] == [[0]]
    assert [[i for i, _, _ in c] for c in frame_chunks(iter(items[:4]), 3)] == [[0, 1, 2], [2, 3]]


def test_object_entering_mid_clip_becomes_a_new_track(tmp_path):
    sample = video_sample(write_shapes_video(tmp_path / "v.mp4", size=SIZE), keyframes=4)
    add_shape_objects(sample)
    assert [k["frame_index"] for k in sample.record["keyframes"]] == [0, 8, 15, 23]
    propagator = ColourPropagatorDouble()
    result = track_video(
        video_frames(sample), detections(sample), propagator,
        chunk_frames=8, min_iou=0.5, max_missing=3, max_tracks=10, min_area=16,
    )  # fmt: skip
    labels = {t["labels"][0]: t for t in result.tracks}
    assert sorted(labels) == ["blue square", "green disc", "red disc"]
    # Red and blue are found on frame 0 and matched (not duplicated) on every later keyframe.
    assert labels["red disc"]["labels"] == ["red disc"]
    assert (labels["red disc"]["first_frame"], labels["red disc"]["last_frame"]) == (0, 23)
    # Green is first detected on keyframe 15, in the chunk of frames 14..21: tracked back to 14.
    green = labels["green disc"]
    assert green["origin"] == {"frame_index": 15, "object_id": 2}
    assert (green["first_frame"], green["last_frame"]) == (14, 23)
    # Chunks of 8 sharing a frame: 0-7, 7-14, 14-21, 21-23; new objects get their own propagation.
    assert [n for n, _ in propagator.calls] == [8, 8, 8, 8, 3]
    assert propagator.calls[3][1] == {2: 1}  # green, prompted on frame 15 = local frame 1 of chunk 14..21
    assert result.frame_times == [{"frame_index": i, "time_s": pytest.approx(i / 8)} for i in range(24)]
    # Consecutive-frame IoU falls with speed: blue 3.5 px/frame (24 px square), red 5.2 (r 14), green 8 (r 12).
    consistency = {label: t["consistency"] for label, t in labels.items()}
    assert consistency["blue square"] > consistency["red disc"] > consistency["green disc"] > 0.3
    for t in result.tracks:
        assert [m["frame_index"] for m in t["masklet"]] == list(range(24))  # every tracked frame
        visible = [m["frame_index"] for m in t["masklet"] if decode_mask(m["segmentation"]).any()]
        assert (visible[0], visible[-1]) == (t["first_frame"], t["last_frame"])
        assert all(decode_mask(m["segmentation"]).shape == (SIZE[1], SIZE[0]) for m in t["masklet"])


# ---------------------------------------------------------------------------------------------------------
# The real sam2 video predictor (tiny random weights; a small input size keeps CPU tests fast).

SAM2_TEST_IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def tiny_sam2():
    from groundmill.stages import sam2_models

    default, threads = sam2_models.TINY_IMAGE_SIZE, torch.get_num_threads()
    sam2_models.TINY_IMAGE_SIZE = SAM2_TEST_IMAGE_SIZE
    torch.set_num_threads(1)  # the CI machine has 2 shared cores; more threads only contend
    try:
        yield sam2_models.load_video_predictor(ModelSpec(), Resources(), seed=0)
    finally:
        sam2_models.TINY_IMAGE_SIZE = default
        torch.set_num_threads(threads)


def test_sam2_stage_writes_masklets_of_the_frame_size_on_every_tracked_frame(tmp_path, tiny_sam2):
    path = write_shapes_video(tmp_path / "v.mp4", num_frames=10, size=(96, 64), enter_at=5)
    sample = video_sample(path, keyframes=3)
    add_shape_objects(sample)
    stage = Sam2Tracking(Sam2Tracking.Params(chunk_frames=4, min_area=4))
    stage.propagator = Sam2Propagator(tiny_sam2)  # what setup() builds, at the test's input size
    stage.process([sample])
    record = sample.record
    assert check_record(record) == []
    assert record["frame_times"] == [{"frame_index": i, "time_s": pytest.approx(i / 8)} for i in range(10)]
    tracks = record["tracks"]
    assert tracks and [t["track_id"] for t in tracks] == list(range(len(tracks)))
    for t in tracks:
        assert [m["frame_index"] for m in t["masklet"]] == list(range(10))
        assert all(decode_mask(m["segmentation"]).shape == (64, 96) for m in t["masklet"])
        assert 0.0 <= t["consistency"] <= 1.0
    # The green disc is detected only from keyframe 5 on (keyframes 0, 4/5, 9): a track of its own.
    assert any(t["labels"] == ["green disc"] and t["origin"]["frame_index"] >= 5 for t in tracks)
    assert sample.stats["tracks"] == len(tracks) and sample.stats["tracked_frames"] == 10


def test_tracking_memory_does_not_grow_with_video_length(tmp_path, tiny_sam2):
    """Peak RSS growth while tracking 4N frames stays within a few MB of N frames (640x480: holding the
    4N decoded frames alone would add about 3N x 0.9 MB)."""
    n, (w, h) = 8, (640, 480)  # n=4 left too little signal over allocator noise on a loaded CI machine
    long = write_shapes_video(tmp_path / "long.mp4", num_frames=4 * n, size=(w, h), enter_at=None)
    short = write_shapes_video(tmp_path / "short.mp4", num_frames=n, size=(w, h), enter_at=None)
    # One large object on frame 0 (small shapes vanish at the test's 64-px model input; memory is the point).
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    objects = {0: [Detection(mask, ["box"], {"frame_index": 0, "object_id": 0})]}
    run_once(tiny_sam2, short, chunk_frames=2, detections=objects)  # warm-up: allocator pools, buffers
    # The long video first: any memory the allocator keeps from it would only help the short one.
    grown_long = run_once(tiny_sam2, long, chunk_frames=2, detections=objects)
    grown_short = run_once(tiny_sam2, short, chunk_frames=2, detections=objects)
    assert (grown_long["frames"], grown_short["frames"]) == (4 * n, n)
    assert grown_long["chunks"] == 4 * n - 1 and grown_long["tracks"] == 1
    held_frames_mb = 3 * n * w * h * 3 / 2**20
    assert grown_long["peak_rss_growth_mb"] < grown_short["peak_rss_growth_mb"] + held_frames_mb / 3, (
        grown_long,
        grown_short,
    )


def test_peak_rss_probe_sees_an_allocation():
    # Fresh anonymous pages: malloc could reuse memory a long test session already holds resident.
    size = 64 * 2**20
    with PeakRss() as rss:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):  # touch every page
            block[offset] = 1
        block.close()
    assert rss.growth_mb > 40


# ---------------------------------------------------------------------------------------------------------
# Inside a real Ray run.


@pytest.mark.slow
def test_tracking_stage_in_the_pipeline_writes_video_records(tmp_path, ray_local):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_shapes_video(inputs / "clip.mp4", num_frames=6, size=(64, 48))
    (inputs / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"inputs: [{inputs}]\noutput: {{dir: {tmp_path / 'out'}}}\nvideo: {{keyframes: 2, stride: 2}}\n"
        "stages:\n  tracking:\n    model: {id: tiny}\n    resources: {batch_size: 1}\n"
        "    params: {chunk_frames: 4}\n"
    )
    run_pipeline(load_config(manifest))
    rows = {Path(r["uri"]).name: r for r in read_index(tmp_path / "out").to_pylist()}
    assert rows["broken.mp4"]["status"] == "error" and rows["clip.mp4"]["status"] == "ok"
    assert "tracking" in {t["stage"] for t in rows["clip.mp4"]["timings"]}
    tars = [str(p) for p in (tmp_path / "out" / SHARDS_DIR).glob("*.tar")]
    (sample,) = list(wds.WebDataset(tars, shardshuffle=False))
    record = json.loads(sample["json"])
    assert "mp4" in sample  # the original video is stored
    # No detection stage ran, so no objects and no tracks; the sampled frames (stride 2) are recorded.
    assert record["tracks"] == [] and [t["frame_index"] for t in record["frame_times"]] == [0, 2, 4]
    assert record["provenance"]["tracking"]["random_weights"] is True
