"""Pure box logic of detection, voting and masks, on hand-built detections with known answers."""

import numpy as np
import pytest

from groundmill.schema import check_record, new_record
from groundmill.stages.base import Sample
from groundmill.stages.boxes import (
    box_agrees,
    box_iou,
    clip_mask_to_box,
    decode_boxes,
    filter_detections,
    mask_dice,
    mask_within_box,
    nms,
    threshold,
    vote,
)
from groundmill.stages.detection import detection_queries, grounding_prompt, query_token_scores
from groundmill.stages.masks import distinct_boxes
from groundmill.stages.voting import BoxVoting, attribute_words, merge, separate_attributes


def det(box, score, label="cat"):
    return {"bbox": list(box), "label": label, "score": score}


def test_box_iou_known_values():
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.0])


def test_mask_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 px
    b[1:3] = True  # 8 px, 4 shared
    assert mask_dice(a, b) == pytest.approx(0.5)
    assert mask_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_threshold_and_nms_keep_best_of_overlapping_boxes():
    dets = [
        det([0, 0, 100, 100], 0.5),
        det([1, 1, 100, 100], 0.9),  # IoU 0.98 with the first: suppresses it
        det([0, 0, 100, 80], 0.8),  # IoU 0.79: kept at 0.9
        det([200, 200, 220, 220], 0.05),  # below threshold
    ]
    assert [d["score"] for d in nms(dets, 0.9)] == [0.9, 0.8, 0.05]
    assert [d["score"] for d in threshold(dets, 0.1)] == [0.5, 0.9, 0.8]
    assert [d["score"] for d in filter_detections(dets, 0.1, 0.9, max_boxes=10)] == [0.9, 0.8]
    assert [d["score"] for d in filter_detections(dets, 0.1, 0.5, max_boxes=10)] == [0.9]
    assert [d["score"] for d in filter_detections(dets, 0.0, 0.9, max_boxes=1)] == [0.9]


def test_decode_boxes_scales_clips_and_labels():
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.95, 0.5, 0.2, 0.2], [0.5, 0.5, 0.001, 0.5]])
    scores = np.array([[0.1, 0.7], [0.6, 0.2], [0.9, 0.9]])
    dets = decode_boxes(boxes, scores, ["cat", "dog"], scale_wh=(200, 200), image_wh=(200, 100))
    assert len(dets) == 2  # the 0.2-px-wide box is dropped
    assert dets[0] == {"bbox": [80.0, 60.0, 120.0, 100.0], "label": "dog", "score": 0.7}  # clipped at y=100
    assert dets[1]["bbox"] == [170.0, 80.0, 200.0, 100.0] and dets[1]["label"] == "cat"


def test_vote_needs_a_second_model():
    per_model = {
        "owl": [det([0, 0, 100, 100], 0.9, "cat"), det([300, 300, 350, 350], 0.4, "lamp")],
        "gdino": [det([5, 5, 100, 100], 0.6, "kitten"), det([0, 200, 50, 260], 0.7, "dog")],
    }
    objects, floating = vote(per_model)
    assert len(objects) == 1
    assert objects[0]["bbox"] == [0, 0, 100, 100] and objects[0]["score"] == 0.9
    assert objects[0]["labels"] == ["cat", "kitten"] and objects[0]["detectors"] == ["gdino", "owl"]
    assert [f["labels"] for f in floating] == [["dog"], ["lamp"]]  # best score first
    assert [o["id"] for o in objects + floating] == [0, 1, 2]


def test_vote_counts_stages_so_two_checkpoints_of_one_family_agree():
    """Detections are keyed by stage: two OWLv2 checkpoints are two voters."""
    per_model = {
        "owlv2_base": [det([0, 0, 100, 100], 0.9, "cat")],
        "owlv2_large": [det([2, 2, 100, 100], 0.8, "cat")],
    }
    objects, floating = vote(per_model)
    assert len(objects) == 1 and floating == [] and objects[0]["detectors"] == ["owlv2_base", "owlv2_large"]


def test_vote_min_agreeing_stages_and_freed_partners():
    """min_agreeing=2: an object needs two other stages; a detection that finds only one floats, and the
    one it found is free again to float on its own (or to join another)."""
    per_model = {
        "a": [det([0, 0, 100, 100], 0.9, "cat"), det([200, 0, 300, 100], 0.8, "dog")],
        "b": [det([1, 1, 100, 100], 0.7, "kitten"), det([201, 0, 300, 100], 0.6, "puppy")],
        "c": [det([0, 1, 100, 100], 0.5, "cat")],
    }
    objects, floating = vote(per_model, min_agreeing=2)
    assert [(o["labels"], o["detectors"]) for o in objects] == [(["cat", "kitten"], ["a", "b", "c"])]
    assert [f["labels"] for f in floating] == [["dog"], ["puppy"]] and [f["detectors"] for f in floating] == [
        ["a"],
        ["b"],
    ]
    objects, floating = vote(per_model, min_agreeing=1)  # GranD: a second model is enough
    assert [o["labels"] for o in objects] == [["cat", "kitten"], ["dog", "puppy"]] and floating == []


def test_voting_min_agreeing_must_be_positive(tmp_path):
    from groundmill.pipeline.config import ConfigError, load_config

    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "inputs: [x]\nstages:\n  d: {type: detection}\n  voting: {params: {min_agreeing: 0}}\n"
    )
    with pytest.raises(ConfigError, match=r"key 'stages\.voting\.params\.min_agreeing': 0 is not >= 1"):
        load_config(manifest)


def test_vote_iou_below_threshold_floats_and_same_model_never_agrees():
    per_model = {
        "owl": [det([0, 0, 100, 100], 0.9), det([0, 0, 100, 100], 0.8)],
        "gdino": [det([0, 0, 100, 60], 0.7)],
    }
    objects, floating = vote(per_model, min_iou=0.65)  # IoU 0.6 with gdino; owl's twin is the same model
    assert objects == [] and len(floating) == 3
    objects, _ = vote(per_model, min_iou=0.6)
    assert len(objects) == 1 and objects[0]["detectors"] == ["gdino", "owl"]


def test_vote_each_detection_joins_one_object():
    per_model = {
        "owl": [det([0, 0, 10, 10], 0.9), det([0, 0, 10, 10.5], 0.8)],
        "gdino": [det([0, 0, 10, 10], 0.5)],
    }
    objects, floating = vote(per_model)
    assert len(objects) == 1 and len(floating) == 1 and floating[0]["score"] == 0.8


def test_vote_mask_dice_can_veto_box_agreement():
    per_model = {"a": [det([0, 0, 10, 10], 0.9)], "b": [det([0, 0, 10, 10], 0.8)]}
    left, right = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    left[:, :5], right[:, 5:] = True, True
    objects, floating = vote(per_model, masks={"a": [left], "b": [right]})
    assert objects == [] and len(floating) == 2
    objects, _ = vote(per_model, masks={"a": [left], "b": [left]})
    assert len(objects) == 1
    objects, _ = vote(per_model, masks={"a": [left], "b": [None]})  # no mask on one side: boxes decide
    assert len(objects) == 1


def box_mask(box, shape=(160, 160), rows=slice(None)):
    """A hand-built mask filling `box` (optionally only some of its rows)."""
    m = np.zeros(shape, bool)
    m[box[1] : box[3], box[0] : box[2]][rows] = True
    return m


def test_vote_with_masks_of_boxes():
    """Voting with the masks stage's masks: one mask per distinct box; boxes that agree (IoU 0.9) but
    whose masks do not (Dice 0.61) float, identical boxes of two models share a mask and agree."""
    per_model = {
        "owl": [det([0, 0, 40, 40], 0.9, "cat"), det([100, 100, 140, 140], 0.8, "dog")],
        "gdino": [det([2, 2, 40, 40], 0.7, "kitten"), det([100, 100, 140, 140], 0.6, "puppy")],
    }
    boxes = distinct_boxes(per_model)
    assert boxes == [(0, 0, 40, 40), (100, 100, 140, 140), (2, 2, 40, 40)]
    mask_of = {
        (0, 0, 40, 40): box_mask([0, 0, 40, 40], rows=slice(0, 20)),  # top half
        (2, 2, 40, 40): box_mask([2, 2, 40, 40]),  # Dice with the top half: 2*684 / (800+1444) = 0.61
        (100, 100, 140, 140): box_mask([100, 100, 140, 140]),
    }
    rule = {"min_iou": 0.65, "min_dice": 0.75, "max_objects": 100, "masks": False}
    objects, floating = merge(per_model, rule)  # boxes alone: both pairs agree
    assert [o["labels"] for o in objects] == [["cat", "kitten"], ["dog", "puppy"]] and floating == []
    objects, floating = merge(per_model, rule, mask_of)
    assert [o["labels"] for o in objects] == [["dog", "puppy"]]
    assert [f["labels"] for f in floating] == [["cat"], ["kitten"]]
    assert [o["id"] for o in objects + floating] == [0, 1, 2]
    objects, floating = merge(per_model, {**rule, "min_dice": 0.6}, mask_of)
    assert len(objects) == 2 and floating == []
    objects, floating = merge(per_model, {**rule, "max_objects": 2}, mask_of)  # objects first, then the best
    assert [o["labels"] for o in objects + floating] == [["dog", "puppy"], ["cat"]]


def attribute_frame() -> dict:
    return {
        "tags": [{"label": "cat", "score": 0.5}, {"label": "orange", "score": 0.3}],
        "detections": {
            "owl": [
                det([0, 0, 40, 40], 0.9, "cat"),
                det([50, 0, 90, 40], 0.6, "red"),
                det([0, 50, 40, 90], 0.5, "red wooden"),
                det([50, 50, 90, 90], 0.4, "orange"),  # a tag: the fruit, an object
                det([10, 10, 30, 30], 0.3, "red car"),  # names an object
            ],
            "gdino": [det([1, 1, 40, 40], 0.8, "kitten"), det([0, 50, 40, 90], 0.7, "Wooden")],
        },
    }


def test_attribute_only_detections_become_floating_attributes():
    frame = attribute_frame()
    per_model, attrs = separate_attributes(frame, attribute_words("attributes"))
    assert attrs == [
        {"bbox": [0, 50, 40, 90], "attributes": ["wooden"], "score": 0.7, "detector": "gdino"},
        {"bbox": [50, 0, 90, 40], "attributes": ["red"], "score": 0.6, "detector": "owl"},
        {"bbox": [0, 50, 40, 90], "attributes": ["red", "wooden"], "score": 0.5, "detector": "owl"},
    ]
    assert {m: [d["label"] for d in ds] for m, ds in per_model.items()} == {
        "owl": ["cat", "orange", "red car"],
        "gdino": ["kitten"],
    }
    untagged = separate_attributes({**frame, "tags": []}, attribute_words("attributes"))[1]
    assert ["orange"] in [a["attributes"] for a in untagged]  # without the tag, "orange" is a colour


def test_voting_stage_writes_floating_attributes_into_a_valid_record():
    media = {"type": "image", "ext": "png", "width": 100, "height": 100}
    record = new_record("0" * 16, {"uri": "x", "sha256": "", "bytes": 0, "format": "PNG"}, media, [])
    record |= attribute_frame()
    sample = Sample(uri="x", key="0" * 16, media_type="image", data=b"", frames=[], record=record)
    BoxVoting().process([sample])
    assert [a["attributes"] for a in record["floating_attributes"]] == [
        ["wooden"],
        ["red"],
        ["red", "wooden"],
    ]
    assert [o["labels"] for o in record["objects"]] == [["cat", "kitten"]]
    assert [o["labels"] for o in record["floating_objects"]] == [["orange"], ["red car"]]
    assert record["voting"]["attribute_vocabulary"] == "attributes" and check_record(record) == []
    record["floating_attributes"].append(
        {"bbox": [90, 90, 120, 95], "attributes": [], "score": 0.2, "detector": "owl"}
    )
    problems = check_record(record)
    assert (
        len(problems) == 2 and "not inside the image" in problems[0] and "names no attribute" in problems[1]
    )


def test_box_agrees_with_tolerance():
    box = [10, 10, 110, 60]
    assert box_agrees([12, 11, 105, 60], box, tolerance=0.1)
    assert not box_agrees([30, 11, 105, 60], box, tolerance=0.1)  # left edge 20 px off (> 10 + 1)
    assert not box_agrees([0, 0, 0, 0], box, tolerance=0.5)  # empty mask


def test_clip_mask_to_box_and_within():
    mask = np.ones((20, 30), bool)
    clipped = clip_mask_to_box(mask, [2.5, 3.2, 10.1, 8.0])
    ys, xs = np.nonzero(clipped)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 10, 3, 7)
    assert mask_within_box([2, 3, 11, 8], [2.5, 3.2, 10.1, 8.0])
    assert not mask_within_box([2, 3, 12, 8], [2.5, 3.2, 10.1, 8.0])
    assert mask_within_box([0, 0, 0, 0], [5, 5, 6, 6])


def test_grounding_prompt_spans_and_token_scores():
    prompt, spans = grounding_prompt(["cat", "traffic light"])
    assert prompt == "cat. traffic light."
    assert [prompt[s:e] for s, e in spans] == ["cat", "traffic light"]
    # tokens: [CLS] cat . traffic light . [SEP]  (offsets as a fast tokenizer reports them)
    offsets = [(0, 0), (0, 3), (3, 4), (5, 12), (13, 18), (18, 19), (0, 0)]
    probs = np.array([[0.9, 0.2, 0.9, 0.1, 0.3, 0.9, 0.9, 0.0]])  # one more column than tokens (padding)
    np.testing.assert_allclose(query_token_scores(probs, offsets, spans), [[0.2, 0.3]])


def test_detection_queries():
    tags = [{"label": "Cat", "score": 0.5}, {"label": "sofa", "score": 0.2}]
    assert detection_queries(tags, ["person", "cat"], True, 10) == ["cat", "sofa", "person"]
    assert detection_queries(tags, ["person"], False, 10) == ["person"]
    assert detection_queries(tags, ["person"], True, 2) == ["cat", "sofa"]
