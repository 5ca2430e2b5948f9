import numpy as np
import pytest

from groundmill.stages.base import Sample
from groundmill.stages.tagging import ClipTagging, load_vocabulary, select_tags
from groundmill.tests.media_factory import rgb_jpeg


def test_select_tags_keeps_top_k_above_threshold_best_first():
    probs = np.array([0.05, 0.5, 0.01, 0.3, 0.14])
    tags = select_tags(probs, ["a", "b", "c", "d", "e"], top_k=3, min_score=0.1)
    assert [t["label"] for t in tags] == ["b", "d", "e"]
    assert select_tags(probs, list("abcde"), top_k=2, min_score=0.4) == [{"label": "b", "score": 0.5}]


def test_vocabularies_merge_without_duplicates(tmp_path):
    extra = tmp_path / "mine.txt"
    extra.write_text("Cat\nrobot\n\n")
    words = load_vocabulary(["coco", str(extra)])
    assert words.count("cat") == 1 and words[-1] == "robot" and len(words) == 81
    with pytest.raises(FileNotFoundError, match="nope"):
        load_vocabulary(["nope"])


def test_tiny_clip_tags_images_and_video_keyframes():
    stage = ClipTagging(ClipTagging.Params(top_k=3, min_score=0.0))
    stage.setup()
    image = Sample("a.jpg", "k1", "image", rgb_jpeg(1), [], {"media": {"type": "image"}})
    video = Sample(
        "v.mp4", "k2", "video", b"", [rgb_jpeg(2), rgb_jpeg(3)],
        {"media": {"type": "video"}, "keyframes": [{"frame_index": 0}, {"frame_index": 5}]},
    )  # fmt: skip
    stage.process([image, video])
    assert len(image.record["tags"]) == 3
    assert all(len(f["tags"]) == 3 for f in video.record["keyframes"])
    assert stage.provenance() == {"model": "tiny", "random_weights": True}
