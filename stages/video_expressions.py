"""Ref-SAV style expressions per track, and a video-level caption.

Per track three template expressions are built from the record alone (pure logic, tested without a
model), then optionally rewritten by the LLM backend:

- object level: how it looks (track label + the attributes of the keyframe object that started it);
- scene level: where it is (region of the frame, the scene's landmark, where it lies against the
  nearest other track);
- video level: how it moves and changes (motion phrases from the track statistics in `tracks`).

A rewrite is kept only if it keeps every identifying word of its template (the label, attributes,
direction and change words); otherwise the template stays and the reason is recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from groundmill.schema import (
    RLE,
    Caption,
    Record,
    Track,
    VideoExpression,
    mask_area,
    mask_bbox,
    masklet_by_frame,
)
from groundmill.stages.base import Sample
from groundmill.stages.llm import Checked, generate_checked
from groundmill.stages.llm.parsing import parse_phrase, parse_prose
from groundmill.stages.llm.stage import LLMStage
from groundmill.stages.tracks import join_phrases, motion_phrases, region_name, track_statistics

LEVELS = ("object_level", "scene_level", "video_level")
TEMPLATE_ID = "video_expression_template@v1"  # provenance of template-only expressions
# Words of a motion phrase that carry its meaning; a rewrite must keep those its template has.
MOTION_WORDS = ("right", "left", "up", "down", "stays", "larger", "smaller", "hidden", "enters", "leaves")


@dataclass(frozen=True)
class TrackExpressions:
    track_id: int
    label: str
    object_level: str
    scene_level: str
    video_level: str
    motion: str  # the motion phrases alone ("moves right, ... and grows larger")
    required: dict[str, tuple[str, ...]]  # level -> words a rewrite must keep


def _centre(rle: dict[str, Any]) -> tuple[float, float]:
    x0, y0, x1, y1 = mask_bbox(rle)
    return (x0 + x1) / 2, (y0 + y1) / 2


def _origin_object(record: Record, track: dict[str, Any]) -> dict[str, Any]:
    origin = track.get("origin", {})
    for frame in record.get("keyframes", []):
        if frame.get("frame_index") == origin.get("frame_index"):
            for obj in frame.get("objects", []) + frame.get("floating_objects", []):
                if obj["id"] == origin.get("object_id"):
                    return obj
    return {}


def _scene_name(record: Record, frame_index: int | None = None) -> str:
    """The landmark of keyframe `frame_index` (else of the first keyframe that has one), or "scene"."""
    frames = [f for f in record.get("keyframes", []) if f.get("landmark")]
    frames.sort(key=lambda f: f.get("frame_index") != frame_index)
    return (frames[0]["landmark"].get("fine") or frames[0]["landmark"].get("category")) if frames else "scene"


def relative_position(centre: tuple[float, float], other: tuple[float, float]) -> str:
    """Where `centre` lies against `other`, along the axis where they differ most (image axes)."""
    dx, dy = centre[0] - other[0], centre[1] - other[1]
    if abs(dx) >= abs(dy):
        return "right of" if dx > 0 else "left of"
    return "below" if dy > 0 else "above"


def _visible_masks(track: Track) -> dict[int, RLE]:
    return {f: rle for f, rle in masklet_by_frame(track).items() if mask_area(rle) > 0}


def _visible_frame(track: Track, preferred: int | None) -> int:
    visible = _visible_masks(track)
    return preferred if preferred in visible else min(visible)


def build_expressions(record: Record, track: Track, max_attributes: int = 2) -> TrackExpressions:
    """The three template expressions of one track, from the record alone."""
    media = record["media"]
    width, height = media["width"], media["height"]
    times = record.get("frame_times", [])
    frames = [t["frame_index"] for t in times] or [track["first_frame"], track["last_frame"]]
    stats = track_statistics(track, times, width, height, (min(frames), max(frames)))
    label = track["labels"][0] if track["labels"] else "object"
    attributes = tuple(_origin_object(record, track).get("attributes", [])[:max_attributes])
    object_level = " ".join(["the", *attributes, label])

    origin_frame = track.get("origin", {}).get("frame_index")
    here = _visible_frame(track, origin_frame)
    cx, cy = _centre(_visible_masks(track)[here])
    scene = _scene_name(record, here if origin_frame is None else origin_frame)
    scene_level = f"the {label} in {region_name((cx / width, cy / height))} of the {scene}"
    others = [
        (abs(c[0] - cx) + abs(c[1] - cy), c, t["labels"][0] if t["labels"] else "object")
        for t in record.get("tracks", [])
        if t["track_id"] != track["track_id"]
        for rle in [_visible_masks(t).get(here)]
        if rle is not None
        for c in [_centre(rle)]
    ]
    scene_required: tuple[str, ...] = (label,)
    if others:
        _, centre, other_label = min(others)
        scene_level += f", {relative_position((cx, cy), centre)} the {other_label}"
        scene_required += (other_label,)

    phrases = motion_phrases(stats)
    video_level = f"the {label} that {join_phrases(phrases)}"
    # Only the verb parts carry motion ("moves right" of "moves right, from the top left to ...").
    heads = [p.split(",")[0].split(" from ")[0].split(" within ")[0].split() for p in phrases]
    motion = tuple(w for w in MOTION_WORDS if any(w in head for head in heads))
    return TrackExpressions(
        track_id=track["track_id"],
        label=label,
        object_level=object_level,
        scene_level=scene_level,
        video_level=video_level,
        motion=join_phrases(phrases),
        required={
            "object_level": (label, *attributes),
            "scene_level": scene_required,
            "video_level": (label, *motion),
        },
    )


def keeps_words(text: str, words: tuple[str, ...]) -> bool:
    lowered = text.lower()
    return all(w.lower() in lowered for w in words)


def caption_template(scene: str, expressions: list[TrackExpressions]) -> str:
    """A plain video caption: every track's video-level expression as a clause."""
    where = "this video" if scene == "scene" else f"this {scene} video"
    if not expressions:
        return f"Nothing is tracked in {where}."
    return f"In {where}, {join_phrases([f'the {e.label} {e.motion}' for e in expressions])}."


def _template_hash() -> str:
    source = [TEMPLATE_ID, MOTION_WORDS, caption_template("scene", [])]
    return hashlib.sha256(json.dumps(source).encode()).hexdigest()[:16]


class VideoExpressions(LLMStage):
    name = "video_expressions"
    provides = ("expressions", "video_captions")
    requires = ("tracks",)
    prompt_name = "video_expression"
    caption_prompt_name = "video_caption"

    @dataclass
    class Params(LLMStage.Params):
        rewrite: bool = True  # LLM rewrites of the templates (kept only when no identifying word is lost)
        max_tracks: int = 20  # per video, longest tracks first
        max_new_tokens: int = 32
        accept_truncated: bool = False  # captions cut at max_new_tokens keep their complete sentences

    def uses_llm(self) -> bool:
        return self.params.rewrite

    def process(self, samples: list[Sample]) -> None:
        pending: list[tuple[dict[str, Any], str, TrackExpressions]] = []  # (entry, level, templates)
        captions: list[tuple[Sample, str, list[TrackExpressions]]] = []
        for sample in samples:
            if sample.media_type != "video":
                continue
            record = sample.record
            # Longest visible first (every masklet spans all sampled frames).
            tracks = sorted(record.get("tracks", []), key=lambda t: -len(_visible_masks(t)))
            tracks = tracks[: self.params.max_tracks]
            built = [build_expressions(record, t) for t in tracks]
            entries = record["expressions"] = []
            for e in built:
                entry = VideoExpression(
                    track_id=e.track_id,
                    object_level=e.object_level,
                    scene_level=e.scene_level,
                    video_level=e.video_level,
                    prompt_id=TEMPLATE_ID,
                    prompt_hash=_template_hash(),
                    source=dict.fromkeys(LEVELS, "template"),  # type: ignore[typeddict-item]
                )
                entries.append(entry)
                pending += [(entry, level, e) for level in LEVELS]
            template = caption_template(_scene_name(record), built)
            record["video_captions"] = [Caption(text=template, model="template")]
            captions.append((sample, template, built))
            sample.stats["video_expressions.tracks"] = float(len(built))
        if self.params.rewrite:
            self.rewrite_expressions(pending)
            self.rewrite_captions(captions)

    def rewrite_expressions(self, pending: list[tuple[dict[str, Any], str, TrackExpressions]]) -> None:
        if not pending:
            return
        rendered = [self.prompt.render(expression=entry[level]) for entry, level, _ in pending]
        results = generate_checked(
            self.backend, [r.messages for r in rendered], self.sampling(), parse_phrase, self.params.attempts
        )
        for (entry, level, e), r, result in zip(pending, rendered, results, strict=True):
            entry.update(prompt_id=r.prompt_id, prompt_hash=r.template_hash)
            entry.setdefault("rendered_hashes", {})[level] = r.rendered_hash
            if result.ok and keeps_words(result.value, e.required[level]):
                entry.setdefault("templates", {})[level] = entry[level]
                entry[level], entry["source"][level] = result.value, "llm"
            else:
                reason = result.reason or f"rewrite lost an identifying word of {list(e.required[level])}"
                entry.setdefault("rewrite_rejected", {})[level] = reason

    def rewrite_captions(self, captions: list[tuple[Sample, str, list[TrackExpressions]]]) -> None:
        from groundmill.prompts import load_prompt

        prompt = load_prompt(self.caption_prompt_name)
        jobs = [
            (s, prompt.render(scene=self._caption_input(s.record, built)), built) for s, _, built in captions
        ]
        if not jobs:
            return
        results: list[Checked] = generate_checked(
            self.backend,
            [r.messages for _, r, _ in jobs],
            self.sampling(),
            lambda g: parse_prose(g, 1, 2, self.params.accept_truncated),
            self.params.attempts,
        )
        for (sample, r, built), result in zip(jobs, results, strict=True):
            labels = tuple(e.label for e in built)
            if result.ok and keeps_words(result.value, labels):
                caption = {"text": result.value, "model": self.model_spec.id, "prompt_id": r.prompt_id,
                           "prompt_hash": r.template_hash}  # fmt: skip
                sample.record["video_captions"].append(caption)
            else:
                sample.stats["video_expressions.caption_rejected"] = 1.0
                sample.record.setdefault("llm_drops", []).append(
                    {
                        "stage": self.name,
                        "reason": result.reason or f"caption left out one of {list(labels)}",
                        "attempts": result.attempts,
                        **r.provenance(),
                    }  # fmt: skip
                )

    @staticmethod
    def _caption_input(record: Record, built: list[TrackExpressions]) -> str:
        objects = "; ".join(e.video_level for e in built) or "nothing moves"
        return f"Scene: {_scene_name(record)}\nObjects: {objects}"
