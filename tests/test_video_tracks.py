"""Tracking logic on hand-built masks with known answers: IoU matching, track lifecycles, temporal
consistency, track statistics and motion words."""

from __future__ import annotations

import numpy as np
import pytest

from groundmill.schema import encode_mask, mask_area
from groundmill.stages.tracks import (
    TrackBook,
    join_phrases,
    mask_iou,
    match_by_iou,
    motion_phrases,
    track_statistics,
)

H, W = 60, 90


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


EMPTY = np.zeros((H, W), dtype=bool)


def test_mask_iou_known_values():
    assert mask_iou(box(0, 0, 10, 10), box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert mask_iou(box(0, 0, 10, 10), box(20, 20, 30, 30)) == 0.0
    assert mask_iou(EMPTY, EMPTY) == 1.0


def test_match_by_iou_is_one_to_one_best_first_with_threshold():
    tracks = {7: box(0, 0, 10, 10), 8: box(40, 0, 50, 10), 9: EMPTY}
    dets = [box(1, 0, 11, 10), box(0, 0, 9, 10), box(41, 0, 51, 10), box(70, 40, 80, 50)]
    matched, unmatched = match_by_iou(tracks, dets, min_iou=0.5)
    # dets 0 (IoU 9/11) and 1 (IoU 0.9) both overlap track 7: the better one (1) wins it.
    assert matched == {1: 7, 2: 8}
    assert unmatched == [0, 3]
    assert match_by_iou(tracks, [box(5, 0, 15, 10)], min_iou=0.5) == ({}, [0])  # IoU 1/3 is too low


def test_track_book_consistency_occlusion_and_end():
    book = TrackBook(max_missing=2)
    a = book.start(["cat"], {"frame_index": 0, "object_id": 3})
    b = book.start(["dog"], {"frame_index": 0, "object_id": 4})
    frames_a = [
        box(0, 0, 10, 10),
        box(5, 0, 15, 10),
        EMPTY,
        box(5, 0, 15, 10),
        EMPTY,
        EMPTY,
        box(5, 0, 15, 10),
    ]
    for f, m in enumerate(frames_a):
        book.observe(a.track_id, f, m)
        book.observe(b.track_id, f, EMPTY if f < 2 else box(60, 30, 70, 40))  # appears at frame 2
    book.vote(a.track_id, ["kitten", "cat"])
    book.vote(a.track_id, ["kitten"])
    # a: pairs 1/3, 0 (to hidden), 0 (back), 0 (hidden again); then a second empty frame ends it.
    assert a.ended and a.last_visible_frame == 3
    assert a.consistency == pytest.approx(round((1 / 3) / 4, 4))
    frames = list(range(len(frames_a)))
    records = book.records(frames, H, W)
    ra, rb = records
    assert ra["labels"] == ["kitten", "cat"]
    # One entry per covered frame, stated empty where hidden, before the start and after the end.
    assert all([m["frame_index"] for m in r["masklet"]] == frames for r in records)
    assert visible_frames(ra) == [0, 1, 3]  # a's mask on frame 6 came after it ended: dropped
    assert visible_frames(rb) == [2, 3, 4, 5, 6]
    assert (ra["first_frame"], ra["last_frame"]) == (0, 3)
    assert (rb["first_frame"], rb["last_frame"], rb["consistency"]) == (2, 6, 1.0)
    assert all(m["segmentation"]["size"] == [H, W] for r in records for m in r["masklet"])
    # b is visible on 5 frames, a on 3
    assert [r["track_id"] for r in book.records(frames, H, W, min_frames=4)] == [0]
    assert book.records(frames, H, W, min_frames=4)[0]["labels"] == ["dog"]


def test_small_masks_count_as_hidden():
    book = TrackBook(max_missing=1, min_area=20)
    t = book.start(["x"], {})
    book.observe(t.track_id, 0, box(0, 0, 3, 3))  # 9 px: not started yet
    book.observe(t.track_id, 1, box(0, 0, 5, 5))
    book.observe(t.track_id, 2, box(0, 0, 4, 4))  # 16 px: hidden -> ends
    book.observe(t.track_id, 3, box(0, 0, 5, 5))  # ignored: the track has ended
    assert t.ended and visible_frames(book.records([0, 1, 2, 3], H, W)[0]) == [1]


def visible_frames(track: dict) -> list[int]:
    return [m["frame_index"] for m in track["masklet"] if mask_area(m["segmentation"]) > 0]


def masklet_track(masks: dict[int, np.ndarray]) -> dict:
    masklet = [{"frame_index": f, "segmentation": encode_mask(m)} for f, m in masks.items()]
    return {"track_id": 0, "masklet": masklet}


def test_statistics_and_motion_of_a_square_moving_right_and_growing():
    track = masklet_track({0: box(5, 25, 15, 35), 1: box(30, 22, 45, 37), 2: EMPTY, 3: box(65, 20, 85, 40)})
    times = [{"frame_index": f, "time_s": f * 0.5} for f in range(4)]
    s = track_statistics(track, times, W, H, video_frames=(0, 3))
    assert (s.first_frame, s.last_frame, s.duration_s) == (0, 3, 1.5)
    assert s.visible_fraction == 0.75 and s.hidden_spans == 1
    assert s.direction_deg == pytest.approx(0.0)
    assert s.displacement == pytest.approx(65 / np.hypot(W, H), abs=1e-3)
    assert s.size_ratio == 4.0
    assert not s.enters and not s.leaves  # it starts at the video's start and lasts to its end
    assert motion_phrases(s) == [
        "moves right, from the left to the right",
        "grows larger",
        "is hidden once and reappears",
    ]


def test_entering_still_and_leaving_objects():
    entering = masklet_track({4: box(80, 40, 90, 50), 5: box(70, 40, 80, 50)})
    s = track_statistics(entering, [], W, H, video_frames=(0, 9))
    assert s.enters and not s.leaves
    assert motion_phrases(s) == [
        "enters the frame from the bottom right",
        "moves left within the bottom right",
    ]
    still = masklet_track({0: box(40, 20, 50, 30), 9: box(41, 20, 51, 30)})
    assert motion_phrases(track_statistics(still, [], W, H, video_frames=(0, 9))) == ["stays in the centre"]
    leaving = masklet_track({0: box(40, 20, 50, 30), 3: box(40, 50, 50, 60)})
    s = track_statistics(leaving, [], W, H, video_frames=(0, 9))
    assert motion_phrases(s)[-2:] == ["moves down, from the centre to the bottom", "leaves the frame"]
    assert join_phrases(["a", "b", "c"]) == "a, b and c" and join_phrases(["a"]) == "a"
    with pytest.raises(ValueError):
        track_statistics(masklet_track({0: EMPTY}), [], W, H, video_frames=(0, 1))
