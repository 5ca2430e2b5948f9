"""The pure logic of video tracking, apart from any model or decoder so it is tested on hand-built masks:
matching detections to tracks by mask IoU, track lifecycles (start, occlusion, end), temporal
consistency, and the track statistics and motion words that video-level expressions are built from.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from groundmill.schema import (
    RLE,
    FrameTime,
    MaskletFrame,
    empty_rle,
    encode_mask,
    mask_area,
    mask_bbox,
)
from groundmill.schema import (
    Track as TrackRecord,
)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of one size; two empty masks have IoU 1 (they agree)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def match_by_iou(
    tracks: dict[int, np.ndarray], detections: list[np.ndarray], min_iou: float
) -> tuple[dict[int, int], list[int]]:
    """Greedy one-to-one matching, best IoU first: ({detection index: track id}, unmatched detections).

    A pair counts only with IoU >= min_iou; empty track masks (an occluded track) match nothing.
    """
    pairs = []
    for d, det in enumerate(detections):
        for tid, mask in tracks.items():
            if mask.any() and det.any():
                iou = mask_iou(mask, det)
                if iou >= min_iou:
                    pairs.append((iou, d, tid))
    matched: dict[int, int] = {}
    used: set[int] = set()
    for _, d, tid in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        if d not in matched and tid not in used:
            matched[d] = tid
            used.add(tid)
    return matched, [d for d in range(len(detections)) if d not in matched]


@dataclass
class Track:
    """One object through a video. The masklet holds every frame from the first visible one on."""

    track_id: int
    label_votes: Counter[str] = field(default_factory=Counter)
    masklet: dict[int, RLE] = field(default_factory=dict)  # frame_index -> RLE (empty while occluded)
    last_visible: np.ndarray | None = None  # the latest non-empty mask: the prompt for the next chunk
    last_visible_frame: int = -1
    missing: int = 0  # consecutive frames without a mask
    ended: bool = False
    origin: dict[str, int] = field(default_factory=dict)  # the keyframe object that started it
    _previous: np.ndarray | None = None
    _iou_sum: float = 0.0
    _iou_pairs: int = 0

    @property
    def consistency(self) -> float:
        """Mean IoU of consecutive frames' masks (pairs where both are empty are skipped)."""
        return round(self._iou_sum / self._iou_pairs, 4) if self._iou_pairs else 1.0


class TrackBook:
    """The tracks of one video, fed frame by frame in presentation order.

    A track starts at its first visible frame and ends once its mask stays smaller than `min_area`
    pixels for `max_missing` consecutive frames; an ended track takes no more frames, so an object that
    comes back later is found again by discovery and becomes a new track.
    """

    def __init__(self, max_missing: int, min_area: int = 1):
        self.max_missing = max_missing
        self.min_area = min_area
        self.tracks: dict[int, Track] = {}

    def start(self, labels: list[str], origin: dict[str, int]) -> Track:
        track = Track(track_id=len(self.tracks), origin=origin)
        track.label_votes.update(labels[:1])
        self.tracks[track.track_id] = track
        return track

    def vote(self, track_id: int, labels: list[str]) -> None:
        """A keyframe detection matched this track: its best label is one more vote."""
        self.tracks[track_id].label_votes.update(labels[:1])

    def active(self) -> list[Track]:
        return [t for t in self.tracks.values() if not t.ended and t.last_visible is not None]

    def observe(self, track_id: int, frame_index: int, mask: np.ndarray) -> None:
        track = self.tracks[track_id]
        if track.ended:
            return
        visible = int(mask.sum()) >= self.min_area
        if not visible:
            mask = np.zeros_like(mask)
        if track.last_visible is None and not visible:
            return  # not started yet
        if track._previous is not None and (visible or track._previous.any()):
            track._iou_sum += mask_iou(track._previous, mask)
            track._iou_pairs += 1
        track._previous = mask
        track.masklet[frame_index] = encode_mask(mask)
        if visible:
            track.last_visible, track.last_visible_frame, track.missing = mask, frame_index, 0
        else:
            track.missing += 1
            track.ended = track.missing >= self.max_missing

    def records(self, frames: list[int], height: int, width: int, min_frames: int = 1) -> list[TrackRecord]:
        """The record's `tracks`, ids renumbered from 0: each masklet has one entry per frame of `frames`
        (every frame the tracker covered), empty before the track starts and after its last visible frame."""
        empty = empty_rle(height, width)
        out: list[TrackRecord] = []
        for track in self.tracks.values():
            masks = {f: rle for f, rle in track.masklet.items() if f <= track.last_visible_frame}
            if sum(1 for rle in masks.values() if mask_area(rle) > 0) < min_frames:
                continue
            record = TrackRecord(
                track_id=len(out),
                labels=[label for label, _ in track.label_votes.most_common()],
                masklet=[MaskletFrame(frame_index=f, segmentation=masks.get(f, empty)) for f in frames],
                first_frame=min(masks),
                last_frame=track.last_visible_frame,
                consistency=track.consistency,
            )
            if track.origin:
                record["origin"] = track.origin  # type: ignore[typeddict-item]
            out.append(record)
        return out


# ---------------------------------------------------------------------------------------------------------
# Track statistics and motion words (for video-level expressions).


@dataclass
class TrackStats:
    first_frame: int
    last_frame: int
    duration_s: float
    visible_fraction: float  # visible frames / frames between first and last
    hidden_spans: int  # runs of frames without a mask between visible ones (occlusions)
    displacement: float  # centroid travel first -> last visible frame, in frame diagonals
    direction_deg: float  # of that travel: 0 = right, 90 = down (image axes)
    size_ratio: float  # last visible area / first visible area
    start_xy: tuple[float, float]  # normalised centroid (0..1) at the first visible frame
    end_xy: tuple[float, float]
    enters: bool  # touches the border when it first appears after the video's start
    leaves: bool  # touches the border when it is last seen before the video's end


def _centre(box: list[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _touches_border(box: list[float], width: int, height: int, margin: float = 2.0) -> bool:
    return box[0] <= margin or box[1] <= margin or box[2] >= width - margin or box[3] >= height - margin


def track_statistics(
    track: TrackRecord,
    frame_times: list[FrameTime],
    width: int,
    height: int,
    video_frames: tuple[int, int],
) -> TrackStats:
    """Statistics of one record track from its masklet (RLE areas and boxes, no decoding).

    `video_frames` is the (first, last) frame index the tracker covered, to tell entering from starting.
    """
    masklet = sorted(track["masklet"], key=lambda m: m["frame_index"])
    areas = [mask_area(m["segmentation"]) for m in masklet]
    visible = [i for i, a in enumerate(areas) if a > 0]
    if not visible:
        raise ValueError(f"track {track['track_id']} has no visible frame")
    first, last = visible[0], visible[-1]
    box0, box1 = mask_bbox(masklet[first]["segmentation"]), mask_bbox(masklet[last]["segmentation"])
    (x0, y0), (x1, y1) = _centre(box0), _centre(box1)
    hidden_spans, in_gap = 0, False
    for area in areas[first : last + 1]:
        gap = area == 0
        hidden_spans += gap and not in_gap
        in_gap = gap
    times = {t["frame_index"]: t["time_s"] for t in frame_times}
    f0, f1 = masklet[first]["frame_index"], masklet[last]["frame_index"]
    diagonal = math.hypot(width, height)
    return TrackStats(
        first_frame=f0,
        last_frame=f1,
        duration_s=round(times.get(f1, 0.0) - times.get(f0, 0.0), 4),
        visible_fraction=round(len(visible) / (last - first + 1), 4),
        hidden_spans=hidden_spans,
        displacement=round(math.hypot(x1 - x0, y1 - y0) / diagonal, 4),
        direction_deg=round(math.degrees(math.atan2(y1 - y0, x1 - x0)) % 360, 2),
        size_ratio=round(areas[last] / areas[first], 4),
        start_xy=(round(x0 / width, 4), round(y0 / height, 4)),
        end_xy=(round(x1 / width, 4), round(y1 / height, 4)),
        enters=f0 > video_frames[0] and _touches_border(box0, width, height),
        leaves=f1 < video_frames[1] and _touches_border(box1, width, height),
    )


_DIRECTIONS = ("right", "down and to the right", "down", "down and to the left", "left", "up and to the left",
               "up", "up and to the right")  # fmt: skip
STILL_BELOW = 0.05  # travel under 5% of the frame diagonal reads as staying in place
GROWS_ABOVE, SHRINKS_BELOW = 1.5, 1 / 1.5


def region_name(xy: tuple[float, float]) -> str:
    """Where a normalised point lies, in words: 'the top left', 'the centre', 'the bottom'."""
    col = "left" if xy[0] < 1 / 3 else "right" if xy[0] > 2 / 3 else "centre"
    row = "top" if xy[1] < 1 / 3 else "bottom" if xy[1] > 2 / 3 else "middle"
    if (row, col) == ("middle", "centre"):
        return "the centre"
    if row == "middle":
        return f"the {col}"
    if col == "centre":
        return f"the {row}"
    return f"the {row} {col}"


def motion_phrases(stats: TrackStats) -> list[str]:
    """Plain phrases for how a track moves and changes, in time order of what they describe."""
    phrases = []
    if stats.enters:
        phrases.append(f"enters the frame from {region_name(stats.start_xy)}")
    if stats.displacement < STILL_BELOW:
        phrases.append(f"stays in {region_name(stats.start_xy)}")
    else:
        word = _DIRECTIONS[round(stats.direction_deg / 45) % 8]
        start, end = region_name(stats.start_xy), region_name(stats.end_xy)
        phrases.append(
            f"moves {word} within {start}" if start == end else f"moves {word}, from {start} to {end}"
        )
    if stats.size_ratio > GROWS_ABOVE:
        phrases.append("grows larger")
    elif stats.size_ratio < SHRINKS_BELOW:
        phrases.append("gets smaller")
    if stats.hidden_spans:
        times = "once" if stats.hidden_spans == 1 else f"{stats.hidden_spans} times"
        phrases.append(f"is hidden {times} and reappears")
    if stats.leaves:
        phrases.append("leaves the frame")
    return phrases


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]
