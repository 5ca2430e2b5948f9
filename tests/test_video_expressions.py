"""Ref-SAV style expressions on hand-built video records: templates from track statistics (known
answers), and LLM rewrites kept, rejected or retried through a scripted backend double."""

from __future__ import annotations

import numpy as np

from groundmill.schema import encode_mask
from groundmill.stages.base import Sample
from groundmill.stages.llm import FINISH_LENGTH, FINISH_STOP, Generation, LLMBackend, LLMConfig
from groundmill.stages.video_expressions import (
    TEMPLATE_ID,
    VideoExpressions,
    build_expressions,
    caption_template,
    relative_position,
)

H, W = 90, 120


def square(x: int, y: int, side: int) -> dict:
    m = np.zeros((H, W), dtype=bool)
    m[y : y + side, x : x + side] = True
    return encode_mask(m)


def video_record() -> dict:
    """A red disc moving from the top left to the top right, a blue square staying bottom centre."""
    red = [{"frame_index": f, "segmentation": square(5 + 25 * f, 5, 12)} for f in range(5)]
    blue = [{"frame_index": f, "segmentation": square(55, 70, 14)} for f in range(5)]
    return {
        "key": "k" * 24,
        "media": {"type": "video", "ext": "mp4", "width": W, "height": H, "fps": 4.0},
        "keyframes": [
            {
                "frame_index": 0,
                "time_s": 0.0,
                "landmark": {"category": "outdoor", "fine": "playground", "score": 1},
                "objects": [
                    {
                        "id": 3,
                        "bbox": [5, 5, 17, 17],
                        "labels": ["disc"],
                        "attributes": ["red", "round", "shiny"],
                        "score": 0.9,
                        "detectors": [],
                    }
                ],
            },
        ],  # fmt: skip
        "frame_times": [{"frame_index": f, "time_s": f * 0.25} for f in range(5)],
        "tracks": [
            {
                "track_id": 0,
                "labels": ["disc"],
                "masklet": red,
                "first_frame": 0,
                "last_frame": 4,
                "consistency": 0.4,
                "origin": {"frame_index": 0, "object_id": 3},
            },
            {
                "track_id": 1,
                "labels": ["square", "box"],
                "masklet": blue,
                "first_frame": 0,
                "last_frame": 4,
                "consistency": 1.0,
                "origin": {"frame_index": 2, "object_id": 9},
            },
        ],  # fmt: skip
        "provenance": {},
    }


def test_templates_follow_the_track_statistics():
    record = video_record()
    red = build_expressions(record, record["tracks"][0])
    assert red.object_level == "the red round disc"  # the two first attributes of its keyframe object
    assert red.scene_level == "the disc in the top left of the playground, above the square"
    assert red.video_level == "the disc that moves right, from the top left to the top right"
    assert red.required["video_level"] == ("disc", "right")
    blue = build_expressions(record, record["tracks"][1])
    assert blue.object_level == "the square"  # its origin object is not in the keyframes
    assert blue.video_level == "the square that stays in the bottom"
    assert blue.scene_level == "the square in the bottom of the playground, below the disc"
    assert caption_template("playground", [red, blue]) == (
        "In this playground video, the disc moves right, from the top left to the top right "
        "and the square stays in the bottom."
    )
    assert caption_template("scene", []) == "Nothing is tracked in this video."
    assert relative_position((10, 0), (0, 3)) == "right of" and relative_position((0, 0), (1, 9)) == "above"


class RuleBackendDouble(LLMBackend):
    """Test double: answers each prompt from a rule on its last user message; logs every prompt."""

    name = "rule-double"

    def __init__(self, rule):
        super().__init__(LLMConfig(), "rule-double")
        self.rule = rule
        self.seen: list[str] = []

    def generate(self, prompts, params):
        texts = [p[-1]["content"] for p in prompts]
        self.seen += texts
        return [self.rule(t, self.seen.count(t)) for t in texts]


def stage_with(rule) -> tuple[VideoExpressions, RuleBackendDouble]:
    stage = VideoExpressions(VideoExpressions.Params(attempts=2))
    stage.backend = RuleBackendDouble(rule)
    return stage, stage.backend


def sample_of(record) -> Sample:
    return Sample(uri="v.mp4", key=record["key"], media_type="video", data=b"", frames=[], record=record)


def test_rewrites_are_kept_only_when_they_keep_identifying_words():
    def rule(text: str, times: int) -> Generation:
        phrase = text.removeprefix("Phrase: ")
        if text.startswith("Scene:"):  # the caption prompt: mentions only the disc
            return Generation("A disc slides across the playground.", FINISH_STOP)
        if "stays" in phrase:
            return Generation("the box", FINISH_STOP)  # loses "square" and "stays": rejected
        if "moves right" in phrase:  # first answer cut at the limit, the retry is fine
            return (
                Generation("the disc gliding", FINISH_LENGTH)
                if times == 1
                else Generation("the disc gliding right across the top", FINISH_STOP)
            )
        return Generation(phrase.replace("the ", "this ", 1), FINISH_STOP)

    stage, backend = stage_with(rule)
    sample = sample_of(video_record())
    stage.process([sample])
    red, blue = sorted(sample.record["expressions"], key=lambda e: e["track_id"])
    assert red["video_level"] == "the disc gliding right across the top"
    assert red["templates"]["video_level"] == "the disc that moves right, from the top left to the top right"
    assert red["object_level"] == "this red round disc" and red["source"]["object_level"] == "llm"
    assert red["prompt_id"] == "video_expression@v1" and len(red["prompt_hash"]) == 16
    assert set(red["rendered_hashes"]) == {"object_level", "scene_level", "video_level"}
    assert (
        blue["video_level"] == "the square that stays in the bottom"
        and blue["source"]["video_level"] == "template"
    )
    assert "lost an identifying word" in blue["rewrite_rejected"]["video_level"]
    # 6 expressions + 1 caption, plus one retry of the truncated answer.
    assert len(backend.seen) == 8
    captions = sample.record["video_captions"]
    assert [c["model"] for c in captions] == ["template"]  # the LLM caption left out the square
    assert "left out one of ['disc', 'square']" in sample.record["llm_drops"][0]["reason"]


def test_without_rewrite_no_llm_is_needed_and_templates_are_recorded():
    stage = VideoExpressions(VideoExpressions.Params(rewrite=False))
    assert stage.provenance() == {} and not stage.uses_llm()
    record = video_record()
    image = Sample(uri="i.jpg", key="i" * 24, media_type="image", data=b"", frames=[], record={"media": {}})
    stage.process([sample_of(record), image])
    assert [e["track_id"] for e in record["expressions"]] == [0, 1]
    assert all(e["prompt_id"] == TEMPLATE_ID for e in record["expressions"])
    assert record["video_captions"][0]["text"].startswith("In this playground video, the disc moves right")
    assert "expressions" not in image.record
