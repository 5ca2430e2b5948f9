"""Pure logic of the scene-category, depth, attribute, caption and grounding stages (no models)."""

import numpy as np
import pytest

from groundmill.stages.attributes import crop, pick_attributes, rank_labels
from groundmill.stages.captions import image_seed, unique_captions
from groundmill.stages.depth import depth_layer, normalise_depth, object_depth
from groundmill.stages.grounding import match_phrase, word_match
from groundmill.stages.landmark import choose_landmark
from groundmill.stages.vocab_groups import load_groups


def test_choose_landmark_picks_fine_class_within_best_category():
    hierarchy = {"indoor": ["kitchen", "office"], "outdoor": ["beach", "street"]}
    fine = {"indoor": np.array([0.3, 0.7]), "outdoor": np.array([0.9, 0.1])}
    lm = choose_landmark(np.array([0.6, 0.4]), ["indoor", "outdoor"], fine, hierarchy)
    assert lm == {"category": "indoor", "fine": "office", "score": pytest.approx(0.42)}


def test_shipped_grouped_vocabularies():
    scenes = load_groups("scene_categories")
    assert list(scenes) == ["indoor", "outdoor", "transportation", "sports and recreation"]
    assert "kitchen" in scenes["indoor"]
    assert set(load_groups("attributes")) == {"colour", "material", "state"}


def test_load_groups_rejects_bad_lines(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("colour red, green\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        load_groups(str(bad))


def test_depth_normalisation_median_and_layers():
    inverse = np.array([[10.0, 10.0], [0.0, 5.0]])  # larger = nearer
    depth = normalise_depth(inverse, larger_is_nearer=True)
    np.testing.assert_allclose(depth, [[0.0, 0.0], [1.0, 0.5]])
    np.testing.assert_allclose(normalise_depth(inverse, larger_is_nearer=False), [[1.0, 1.0], [0.0, 0.5]])
    assert normalise_depth(np.full((2, 2), 3.0), True).max() == 0.0
    mask = np.array([[False, True], [True, True]])
    assert object_depth(depth, mask, [0, 0, 2, 2]) == 0.5  # median of 0, 1, 0.5
    assert object_depth(depth, None, [1, 0, 2, 2]) == 0.25  # box column x=1: 0 and 0.5
    cut = [0.1, 0.6, 0.85]
    assert [depth_layer(d, cut) for d in (0.05, 0.1, 0.59, 0.7, 0.85, 1.0)] == [
        "immediate foreground", "foreground", "foreground", "midground", "background", "background",
    ]  # fmt: skip


def test_rank_labels_and_attributes():
    assert rank_labels(np.array([0.2, 0.5, 0.3]), ["cat", "dog", "fox"], 2) == ["dog", "fox"]
    groups = {"colour": ["red", "blue"], "material": ["metal", "wood"]}
    probs = {"colour": np.array([0.1, 0.9]), "material": np.array([0.55, 0.45])}
    assert pick_attributes(probs, groups, min_prob=0.5) == ["blue", "metal"]
    assert pick_attributes(probs, groups, min_prob=0.6) == ["blue"]


def test_crop_margin_and_minimum_size():
    from PIL import Image

    im = Image.new("RGB", (100, 50))
    assert crop(im, [10, 10, 30, 20], margin=0.5).size == (40, 20)  # 10 px wider each side, 5 px taller
    assert crop(im, [99.5, 49.5, 99.6, 49.6], margin=0.0).size == (1, 1)


def test_caption_helpers():
    assert unique_captions(["a cat", " a cat ", "", "a dog", "a fox"], 2) == ["a cat", "a dog"]
    assert image_seed(0, "k", 0) == image_seed(0, "k", 0) != image_seed(0, "k", 1)


def test_word_match_and_phrase_matching():
    assert word_match({"the", "red", "traffic", "light"}, "traffic light") == 1.0
    assert word_match({"a", "light"}, "traffic light") == 0.5
    objects = [(0, ["cat"]), (1, ["traffic light", "lamp"]), (2, ["dog"])]
    emb = {"cat": np.array([1.0, 0.0]), "traffic light": np.array([0.0, 1.0]), "lamp": np.array([0.6, 0.8]),
           "dog": np.array([0.8, 0.6])}  # fmt: skip
    # words win: "cats" lemma "cat"
    assert match_phrase({"two", "cats", "cat"}, np.array([0.0, 1.0]), objects, emb, 0.75, 0.9) == [0]
    # no word match: embedding similarity with the best label of each object
    assert match_phrase({"a", "kitten"}, np.array([1.0, 0.0]), objects, emb, 0.75, 0.75) == [0, 2]
    assert match_phrase({"a", "kitten"}, np.array([1.0, 0.0]), objects, emb, 0.75, 0.95) == [0]
    assert match_phrase({"a", "light"}, np.array([0.0, -1.0]), objects, emb, 0.75, 0.5) == []
