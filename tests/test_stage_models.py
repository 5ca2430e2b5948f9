"""The GranD image stages with their real model classes (tiny configs, random weights), run in order
on two images and a two-keyframe video sample, without Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from groundmill.media import normalise_image
from groundmill.schema import check_record, decode_mask, encode_mask, mask_bbox, new_record
from groundmill.stages.base import ModelSpec, Resources, Sample
from groundmill.stages.boxes import clip_mask_to_box, mask_within_box
from groundmill.stages.depth import LAYERS
from groundmill.stages.masks import distinct_boxes
from groundmill.stages.sam2_models import predict_boxes
from groundmill.stages.vocab_groups import load_groups
from groundmill.stages.voting import attribute_words, merge, separate_attributes
from groundmill.tests.media_factory import awkward_images
from groundmill.tests.stage_samples import build, image_sample, png, video_sample

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# (stage, params, model id): the order of the demo manifest
PLAN = [
    ("tagging", {"top_k": 4, "min_score": 0.0}, "tiny"),
    ("landmark", {}, "tiny"),
    (
        "detection",
        {"detector": "owlv2", "score_threshold": 0.05, "max_boxes": 4, "classes": ["person"]},
        "tiny",
    ),
    ("detection", {"detector": "grounding_dino", "score_threshold": 0.05, "max_boxes": 4}, "tiny"),
    ("masks", {}, "tiny"),
    # every box pairs with one of the other model (random SAM2 masks never agree: Dice 0 too): objects exist
    ("voting", {"min_iou": 0.0, "min_dice": 0.0}, "tiny"),
    ("depth", {}, "tiny"),
    ("attributes", {"min_attribute_prob": 0.0}, "tiny"),
    ("captions", {"num_captions": 2, "generation": {"max_new_tokens": 8}}, "tiny"),
    ("grounding", {"min_similarity": -1.0}, MINILM),  # real MiniLM; accept any similarity: exercise spans
]


@pytest.fixture(scope="module")
def annotated():
    samples = [image_sample(1), image_sample(2, (64, 80)), video_sample()]
    stages = {}
    for name, params, model_id in PLAN:
        stage = build(name, params, model_id, stage_id=params.get("detector"))  # detections keyed by stage
        stage.setup()
        stage.process(samples)
        stages[name + params.get("detector", "")] = stage
    return samples, stages


def frames(samples):
    return [(s, v) for s in samples for v in s.views()]


def objects_of(view):
    return view.record.get("objects", []) + view.record.get("floating_objects", [])


def test_landmark_is_a_two_level_choice(annotated):
    hierarchy = load_groups("scene_categories")
    for _, view in frames(annotated[0]):
        lm = view.record["landmark"]
        assert lm["fine"] in hierarchy[lm["category"]] and 0 < lm["score"] <= 1


def test_detectors_query_tags_and_classes_with_boxes_in_the_image(annotated):
    for _, view in frames(annotated[0]):
        tags = {t["label"] for t in view.record["tags"]}
        queries = {"owlv2": tags | {"person"}, "grounding_dino": tags}  # only OWLv2 has extra classes
        dets = view.record["detections"]
        assert set(dets) == {"owlv2", "grounding_dino"}
        assert 0 < len(dets["owlv2"]) <= 4 and len(dets["grounding_dino"]) <= 4
        w, h = view.image.size
        for model, boxes in dets.items():
            for d in boxes:
                x0, y0, x1, y1 = d["bbox"]
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and d["score"] >= 0.05
                assert d["label"] in queries[model]


def test_voting_splits_all_detections(annotated):
    for _, view in frames(annotated[0]):
        objs = objects_of(view)
        n_dets = sum(len(v) for v in view.record["detections"].values())
        merged = sum(len(o["detectors"]) for o in objs)
        assert merged == n_dets  # every detection ends in exactly one object or floating object
        assert sorted(o["id"] for o in objs) == list(range(len(objs)))
        assert all(len(o["detectors"]) >= 2 for o in view.record["objects"])
        assert all(len(o["detectors"]) == 1 for o in view.record["floating_objects"])
    assert any(view.record["objects"] for _, view in frames(annotated[0]))


def test_masks_depth_attributes_on_every_object(annotated):
    vocab = {v for values in load_groups("attributes").values() for v in values}
    n = 0
    for _, view in frames(annotated[0]):
        w, h = view.image.size
        for obj in objects_of(view):
            n += 1
            mask = decode_mask(obj["segmentation"])
            assert mask.shape == (h, w) and obj["segmentation_source"] == "SAM2"
            assert mask_within_box(mask_bbox(obj["segmentation"]), obj["bbox"])
            assert isinstance(obj["mask_in_box"], bool) and 0 <= obj["predicted_iou"] <= 1.5
            assert 0.0 <= obj["depth"] <= 1.0 and obj["depth_layer"] in LAYERS
            assert 1 <= len(obj["labels"]) <= 3 and set(obj["attributes"]) <= vocab
            assert len(obj["attributes"]) == 3  # min prob 0: one value per group
    assert n > 0


def test_captions_are_reproducible_per_image(annotated):
    samples, stages = annotated
    before = [v.record["captions"] for _, v in frames(samples)]
    assert all(1 <= len(c) <= 2 and all(x["model"] == "tiny" for x in c) for c in before)
    stages["captions"].process(samples[::-1])  # another batch order: same captions per image
    assert [v.record["captions"] for _, v in frames(samples)] == before


def test_grounding_spans_index_captions_exactly(annotated):
    samples, stages = annotated
    total = 0
    for s in samples:
        assert check_record(s.record) == []
    for _, view in frames(samples):
        ids = {o["id"] for o in objects_of(view)}
        for g in view.record["relationships"]["grounding"]:
            s, e = g["tokens_positive"]
            assert view.record["captions"][g["caption_index"]]["text"][s:e] == g["phrase"]
            assert set(g["object_ids"]) <= ids and g["object_ids"]
            total += 1
    assert total > 0
    assert stages["grounding"].provenance()["random_weights"] is False
    assert stages["masks"].provenance()["random_weights"] is True


def test_sam2_local_checkpoint_loads_the_same_weights(tmp_path, annotated):
    """A directory with a hydra config and a `{"model": state_dict}` .pt loads (weights_only) unchanged."""
    import shutil

    import sam2
    import torch

    from groundmill.stages.sam2_models import (
        TINY_CONFIG,
        TINY_IMAGE_SIZE,
        load_image_predictor,
        predict_boxes,
    )

    tiny = annotated[1]["masks"].predictor
    assert tiny._bb_feat_sizes[-1] == (TINY_IMAGE_SIZE // 16,) * 2
    torch.save({"model": tiny.model.state_dict()}, tmp_path / "weights.pt")
    shutil.copy(f"{sam2.__path__[0]}/{TINY_CONFIG}", tmp_path / "model.yaml")
    # a saved config states its own image size: the tiny one's, written into sam2's hiera-t file
    text = (tmp_path / "model.yaml").read_text().replace("image_size: 1024", f"image_size: {TINY_IMAGE_SIZE}")
    text = text.replace(
        "feat_sizes: [64, 64]", f"feat_sizes: [{TINY_IMAGE_SIZE // 16}, {TINY_IMAGE_SIZE // 16}]"
    )
    (tmp_path / "model.yaml").write_text(text)
    local = load_image_predictor(ModelSpec(id=str(tmp_path)), Resources())
    image = Image.open(io.BytesIO(png(3)))
    box = [[5, 5, 60, 50]]
    m1, iou1 = predict_boxes(tiny, image, box)
    m2, iou2 = predict_boxes(local, image, box)
    assert np.array_equal(m1, m2) and np.allclose(iou1, iou2)


def test_owlv2_local_directory_loads_like_a_hub_id(tmp_path, annotated):
    det = annotated[1]["detectionowlv2"].detector
    det.model.save_pretrained(tmp_path)
    det.processor.save_pretrained(tmp_path)
    local = build("detection", {"detector": "owlv2"}, str(tmp_path))
    local.setup()
    image = Image.open(io.BytesIO(png(4)))
    assert local.detector.detect(image, ["cat", "dog"], "a photo of a {}") == det.detect(
        image, ["cat", "dog"], "a photo of a {}"
    )
    assert local.provenance()["random_weights"] is False and local.provenance()["model"] == str(tmp_path)


def hand_detections() -> dict[str, list[dict]]:
    def det(box, score, label):
        return {"bbox": box, "label": label, "score": score}

    return {  # two pairs that agree by box (IoU 0.9; an identical box), one lone box, one attribute
        "owlv2": [det([10.0, 10.0, 50.0, 50.0], 0.9, "cat"), det([60.0, 5.0, 90.0, 30.0], 0.5, "lamp")],
        "grounding_dino": [
            det([12.0, 12.0, 50.0, 50.0], 0.8, "kitten"),
            det([60.0, 5.0, 90.0, 30.0], 0.4, "light"),
            det([5.0, 40.0, 30.0, 70.0], 0.3, "cup"),
            det([40.0, 40.0, 80.0, 70.0], 0.6, "wooden"),  # attribute-only: no vote, no mask
        ],
    }


@pytest.mark.parametrize("min_dice", [0.75, 0.0])
def test_masks_then_one_vote_with_sam2_masks_of_every_detection(annotated, monkeypatch, min_dice):
    """Data flows one way: the masks stage gives every raw detection tiny SAM2's mask (one predictor
    call per image), then voting applies GranD's rule once with box IoU and mask Dice, and the objects
    keep exactly those masks; each mask is stored once, on its object."""
    masks_stage = annotated[1]["masks"]
    predictor = masks_stage.predictor
    sample = image_sample(7)
    sample.record["detections"] = hand_detections()
    view = sample.views()[0]
    boxes = distinct_boxes(sample.record["detections"])
    raw, _ = predict_boxes(predictor, view.image, [list(b) for b in boxes])
    mask_of = {b: clip_mask_to_box(m, list(b)) for b, m in zip(boxes, raw, strict=True)}

    calls = []
    set_image = predictor.set_image
    monkeypatch.setattr(predictor, "set_image", lambda image: calls.append(1) or set_image(image))
    masks_stage.process([sample])
    assert len(calls) == 1  # one batched SAM2 call for the image
    for det in (d for dets in sample.record["detections"].values() for d in dets):
        assert np.array_equal(decode_mask(det["segmentation"]), mask_of[tuple(det["bbox"])])
        assert isinstance(det["mask_in_box"], bool) and det["segmentation_source"] == "SAM2"

    per_model, attrs = separate_attributes(sample.record, attribute_words("attributes"))
    assert [a["attributes"] for a in attrs] == [["wooden"]]
    rule = {"min_iou": 0.65, "min_dice": min_dice, "min_agreeing": 1, "max_objects": 100, "masks": True,
            "attribute_vocabulary": "attributes"}  # fmt: skip
    expected = merge(per_model, rule, mask_of)
    build("voting", {"min_dice": min_dice}, "tiny").process([sample])
    rec = sample.record
    assert rec["voting"] == rule
    assert rec["floating_attributes"] == attrs
    got = (rec["objects"], rec["floating_objects"])
    strip = ("segmentation", "segmentation_source", "predicted_iou", "mask_in_box", "stability_score")
    assert [[{k: v for k, v in o.items() if k not in strip} for o in g] for g in got] == list(expected)
    if min_dice == 0.0:  # without the Dice check, voting with masks finds what box voting finds
        assert [o["labels"] for o in rec["objects"]] == [["cat", "kitten"], ["lamp", "light"]]
    assert check_record(rec) == []
    h, w = view.image.height, view.image.width
    for obj in rec["objects"] + rec["floating_objects"]:
        mask = decode_mask(obj["segmentation"])
        assert mask.shape == (h, w) and np.array_equal(mask, mask_of[tuple(obj["bbox"])])
        assert mask_within_box(mask_bbox(obj["segmentation"]), obj["bbox"])
        assert isinstance(obj["mask_in_box"], bool) and obj["segmentation_source"] == "SAM2"
    assert not any(set(strip) & set(d) for dets in rec["detections"].values() for d in dets)


def test_voting_without_masks_compares_boxes_alone(annotated):
    """No masks stage before voting: the rule says so and compares boxes; with masks and no Dice
    threshold the same objects form, now with masks."""
    sample = image_sample(8)
    sample.record["detections"] = hand_detections()
    build("voting", {"min_dice": 0.0}, "tiny").process([sample])
    rec = sample.record
    before = [[o["labels"] for o in rec[g]] for g in ("objects", "floating_objects")]
    assert rec["voting"]["masks"] is False and check_record(rec) == []
    assert not any("segmentation" in o for o in rec["objects"] + rec["floating_objects"])

    masked = image_sample(8)
    masked.record["detections"] = hand_detections()
    annotated[1]["masks"].process([masked])
    build("voting", {"min_dice": 0.0}, "tiny").process([masked])
    rec = masked.record
    assert [[o["labels"] for o in rec[g]] for g in ("objects", "floating_objects")] == before
    assert rec["voting"]["masks"] is True and check_record(rec) == []
    assert all(
        decode_mask(o["segmentation"]).shape == (72, 96) for o in rec["objects"] + rec["floating_objects"]
    )


def test_two_detection_stages_of_one_family_write_their_own_keys(annotated):
    """Detections are keyed by the manifest's stage name, so two OWLv2 stages never overwrite."""
    sample = image_sample(9)
    sample.record["tags"] = [{"label": "person", "score": 1.0}]
    owl = annotated[1]["detectionowlv2"]
    for stage_id in ("owl_a", "owl_b"):
        twin = build(
            "detection", {"detector": "owlv2", "score_threshold": 0.0, "max_boxes": 2}, "tiny", stage_id
        )
        twin.detector = owl.detector  # the same tiny model: no second load
        twin.process([sample])
    dets = sample.record["detections"]
    assert set(dets) == {"owl_a", "owl_b"} and dets["owl_a"] == dets["owl_b"] and dets["owl_a"]


def test_masks_keep_a_segmenting_detectors_own_masks(annotated, monkeypatch):
    """A detection that brought its own mask (a Mask2Former-style detector) keeps it; SAM2 is prompted
    only with the boxes that have none."""
    masks_stage = annotated[1]["masks"]
    sample = image_sample(10)
    sample.record["detections"] = hand_detections()
    own = np.zeros((72, 96), bool)
    own[12:50, 12:50] = True
    kitten = sample.record["detections"]["grounding_dino"][0]
    kitten.update(segmentation=encode_mask(own), segmentation_source="Mask2Former")
    prompted = []
    predict = masks_stage.predictor.predict
    monkeypatch.setattr(
        masks_stage.predictor,
        "predict",
        lambda box, **kw: prompted.append(len(box)) or predict(box=box, **kw),
    )
    masks_stage.process([sample])
    assert prompted == [len(distinct_boxes(hand_detections())) - 1]
    assert kitten["segmentation_source"] == "Mask2Former" and np.array_equal(
        decode_mask(kitten["segmentation"]), own
    )
    others = [d for dets in sample.record["detections"].values() for d in dets if d is not kitten]
    assert all(d["segmentation_source"] == "SAM2" for d in others)


@pytest.mark.parametrize("name", sorted(awkward_images()))
def test_every_image_stage_annotates_awkward_pictures(annotated, name):
    """Normalised like any input, then through every stage of the plan with its tiny model: no stage
    fails on an extreme aspect ratio, a 1-pixel side, 16-bit or CMYK input."""
    im = normalise_image(awkward_images()[name], max_pixels=100_000_000, max_side=4096)
    media = {"type": "image", "ext": im.ext, "width": im.width, "height": im.height}
    record = new_record(
        "a" * 16,
        {"uri": name, "sha256": "", "bytes": len(im.data), "format": im.source_format},
        media,
        im.steps,
    )
    sample = Sample(uri=name, key="a" * 16, media_type="image", data=im.data, frames=[], record=record)
    for stage_name, params, _ in PLAN:
        annotated[1][stage_name + params.get("detector", "")].process([sample])
    rec = sample.record
    for field in (
        "tags",
        "landmark",
        "detections",
        "objects",
        "floating_objects",
        "captions",
        "relationships",
    ):
        assert field in rec, field
    assert check_record(rec) == []
    for obj in rec["objects"] + rec["floating_objects"]:
        assert decode_mask(obj["segmentation"]).shape == (im.height, im.width) and "depth" in obj
