"""Verified data (issue 18): mask verifier features, exhaustivity, hard negatives, gating, the trainer's
negative samples and the closed-world bench."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import ndimage

from groundmill.model.tasks import ANSWER, NO_TARGET_ANSWER, referring_samples
from groundmill.schema import check_record, encode_mask, mask_bbox
from groundmill.stages.exhaustivity import (
    best_phrase_hits,
    concept_report,
    confirm,
    hard_negatives,
    neighbours,
)
from groundmill.stages.gcg import drop_rejected_details, gcg_record
from groundmill.stages.llm import Generation
from groundmill.stages.mask_verification import (
    boundary_alignment,
    box_agreement,
    decide,
    edge_map,
    parse_verdict,
    stability_score,
)


def disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a noisy grey texture with stripes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    img = 110 + 15 * np.sin(0.3 * xx)[..., None] + rng.normal(0, 5, (96, 96, 3))
    mask = disc(96, 48, 48, 20)
    img[mask] = (220, 40, 40)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def test_stability_score_is_the_iou_of_the_mask_at_minus_and_plus_delta():
    logits = np.array([[-3.0, -0.5, 0.5, 3.0]])
    assert stability_score(logits, 1.0) == pytest.approx(1 / 3)  # only 3.0 > 1; three values > -1
    assert stability_score(np.full((2, 2), -5.0)) == 0.0


def test_boundary_alignment_tells_the_true_mask_from_eroded_dilated_and_shifted_ones():
    image, mask = scene()
    edges = edge_map(image)
    true = boundary_alignment(mask, edges)
    assert true > 0.9
    for wrong in (
        ndimage.binary_erosion(mask, iterations=4),
        ndimage.binary_dilation(mask, iterations=4),
        np.roll(mask, 7, axis=1),
    ):
        assert boundary_alignment(wrong, edges) < true - 0.4


def test_box_agreement_and_decision_name_each_failed_check():
    _, mask = scene()
    assert box_agreement(mask, mask_bbox(encode_mask(mask))) == pytest.approx(1.0)
    assert box_agreement(mask, [0, 0, 20, 20]) == 0.0
    v = decide({"box_agreement": 0.2, "boundary_alignment": 0.9}, {"box_agreement": 0.7}, 0.5)
    assert v["accepted"] is False and v["reasons"] == ["box_agreement < 0.7"] and v["score"] == 0.55
    assert decide({"box_agreement": 0.9}, {"box_agreement": 0.7}, 0.5)["accepted"] is True


def test_the_judge_answer_is_parsed_or_retried():
    assert parse_verdict(Generation("Reject.", "stop")) == "reject"
    assert parse_verdict(Generation("I would accept it", "stop")) == "accept"
    with pytest.raises(ValueError):
        parse_verdict(Generation("maybe", "stop"))
    with pytest.raises(ValueError):
        parse_verdict(Generation("accept", "length"))


def obj(i: int, label: str, box: list[float], size: int = 64, **extra) -> dict:
    m = np.zeros((size, size), bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = True
    return {"id": i, "bbox": box, "labels": [label], "attributes": [], "score": 0.9, "detectors": ["d"],
            "segmentation": encode_mask(m), **extra}  # fmt: skip


def hit(label: str, box: list[float], score: float = 0.3) -> dict:
    return {"bbox": box, "label": label, "score": score}


def test_an_unmasked_instance_makes_its_concept_not_exhaustive():
    frame = {
        "objects": [obj(0, "cat", [0, 0, 10, 10]), obj(1, "dog", [30, 30, 50, 50])],
        "floating_objects": [],
    }
    hits = {
        "cat": [hit("cat", [0, 0, 10, 10]), hit("cat", [12, 40, 24, 60])],
        "dog": [hit("dog", [30, 30, 50, 50])],
    }
    concepts = concept_report(frame, hits, ["cat", "dog"], ["bird"], 0.5, verified_only=True)
    by = {c["phrase"]: c for c in concepts}
    assert by["cat"] == {
        "phrase": "cat",
        "present": True,
        "exhaustive": False,
        "object_ids": [0],
        "unmatched": 1,
    }
    assert by["dog"]["exhaustive"] and by["dog"]["object_ids"] == [1]
    assert by["bird"] == {
        "phrase": "bird",
        "present": False,
        "exhaustive": True,
        "object_ids": [],
        "unmatched": 0,
    }


def test_rejected_objects_leave_their_concept_and_automatic_masks_count_as_hits():
    rejected = obj(0, "cat", [0, 0, 10, 10], verification={"score": 0.1, "accepted": False, "reasons": ["x"]})
    auto = obj(1, "cat", [40, 40, 60, 60], segmentation_source="SAM2-auto")
    frame = {"objects": [rejected], "floating_objects": [auto]}
    (cat,) = concept_report(frame, {}, ["cat"], [], 0.5, verified_only=True)
    assert cat["object_ids"] == [] and cat["unmatched"] == 1 and not cat["exhaustive"] and cat["present"]


def test_a_place_keeps_its_best_phrase_and_an_object_its_label_is_not_confirmed_is_rejected():
    hits = {
        "red circle": [hit("red circle", [0, 0, 10, 10], 0.2)],
        "red square": [hit("red square", [0, 0, 10, 10], 0.8)],
    }
    best = best_phrase_hits(hits, 0.5)
    assert list(best) == ["red square"]
    swapped = obj(
        0, "red circle", [0, 0, 10, 10], verification={"score": 0.9, "accepted": True, "reasons": []}
    )
    confirm(swapped, [h["bbox"] for h in best.get("red circle", [])], 0.5)
    v = swapped["verification"]
    assert (
        not v["accepted"]
        and v["reasons"] == ["concept not confirmed"]
        and v["features"]["concept_confirmed"] == 0.0
    )
    right = obj(1, "red square", [0, 0, 10, 10])
    confirm(right, [h["bbox"] for h in best["red square"]], 0.5)
    assert right["verification"]["accepted"]


def test_hard_negatives_are_unconfirmed_candidates_and_absent_confusable_neighbours():
    vocab = ["cat", "kitten", "tiger", "car", "dog"]
    emb = np.eye(5)
    emb[1] = [0.8, 0.6, 0, 0, 0]  # kitten ~ cat
    emb[2] = [0.6, 0, 0.8, 0, 0]  # tiger ~ cat, less
    concept = emb[[0]]
    near = neighbours(["cat"], vocab, emb, concept, 3, 0.5, 0.95)
    assert near == ["kitten", "tiger"]  # not cat itself, nothing below 0.5
    frame = {"detections": {"owl": [{"bbox": [0, 0, 1, 1], "label": "dog", "score": 0.5}]}}
    hits = {"tiger": [hit("tiger", [0, 0, 5, 5])]}
    assert hard_negatives(frame, ["dog", "car"], near, hits, 30) == ["car", "kitten"]


def test_gating_drops_phrases_of_rejected_objects_from_details_and_gcg():
    good, bad = obj(0, "cat", [0, 0, 10, 10]), obj(1, "dog", [20, 20, 40, 40])
    bad["verification"] = {"score": 0.1, "accepted": False, "reasons": ["boundary_alignment < 0.5"]}
    caption = "a cat and a dog"
    details = [{"phrase": "a cat", "tokens_positive": [0, 5], "ids": [0], "bbox": [good["bbox"]]},
               {"phrase": "a dog", "tokens_positive": [10, 15], "ids": [1], "bbox": [bad["bbox"]]}]  # fmt: skip
    frame = {"objects": [good, bad], "dense_caption": {"caption": caption, "details": details,
                                                       "verification": {"accepted": True}}}  # fmt: skip
    assert [g["phrase"] for g in gcg_record("x.png", frame, verified_only=False)["groundings"]] == [
        "a cat",
        "a dog",
    ]
    assert [g["phrase"] for g in gcg_record("x.png", frame)["groundings"]] == ["a cat"]
    assert drop_rejected_details(frame) == 1 and [d["phrase"] for d in frame["dense_caption"]["details"]] == [
        "a cat"
    ]


def test_the_trainer_asks_for_hard_negatives_with_an_empty_target():
    record = {"objects": [obj(0, "cat", [0, 0, 10, 10], size=16)],
              "referring_expressions": [{"object_id": 0, "expression": "the cat", "source": "template"}],
              "negatives": ["tiger", "kitten"]}  # fmt: skip
    rows = referring_samples(record, random.Random(0), 16, 3)
    negative = [r for r in rows if r["answer"] == NO_TARGET_ANSWER]
    positive = [r for r in rows if r["answer"] == ANSWER]
    assert len(negative) == 1 and len(positive) == 1
    assert not negative[0]["masks"][0][0].any() and positive[0]["masks"][0][0].any()
    assert negative[0]["question"] in ("please segment tiger .", "please segment kitten .")
    assert len(referring_samples({**record, "negatives": []}, random.Random(0), 16, 3)) == 1


def test_verification_fields_are_typed_in_the_schema():
    record = {"schema_version": 2, "key": "0" * 16, "source": {"uri": "u", "sha256": "", "bytes": 0, "format": "PNG"},
              "media": {"type": "image", "ext": "png", "width": 64, "height": 64}, "normalisation": [], "provenance": {},
              "objects": [obj(0, "cat", [0, 0, 10, 10], stability_score=0.9,
                              verification={"score": 0.9, "accepted": True, "reasons": [],
                                            "features": {"box_agreement": 1.0}})],
              "concepts": [{"phrase": "cat", "present": True, "exhaustive": True, "object_ids": [0]}],
              "negatives": ["tiger"], "near_duplicate_of": "1" * 16}  # fmt: skip
    assert check_record(record) == []
    record["objects"][0]["verification"]["accepted"] = "yes"
    assert check_record(record)


def test_bench_verify_meets_its_targets_on_a_small_closed_world():
    from groundmill.benchmarks.bench_verify import run

    result = run(images=12, seed=1, corrupt=0.5, missing=0.3)
    assert result["mask_rejection_f1"] >= 0.8
    assert result["exhaustivity_recall"] >= 0.8
    assert result["accepted_mean_iou"] >= result["all_mean_iou"] + 0.1
    assert set(result["rejection_rate_by_corruption"]) >= {"clean", "eroded", "dilated", "shifted"}
    assert result["real_weight_features"]["clip_agreement"] is None


def test_ring_index_finds_the_nearest_kept_vector_and_forgets_the_oldest_part():
    from groundmill.stages.near_duplicates import RingIndex

    index = RingIndex(dim=3, capacity=4, parts=2)
    assert index.search(np.array([1.0, 0, 0])) == (-1.0, None)
    for i, v in enumerate(np.eye(3)):
        index.add(v, f"k{i}")
    assert index.search(np.array([0.0, 0.9, 0.1])) == (pytest.approx(0.9), "k1")
    index.add(np.array([0.0, 0.0, 1.0]), "k3")
    index.add(np.array([0.6, 0.8, 0.0]), "k4")  # a third part: the first (k0, k1) is dropped
    assert len(index) == 3
    assert index.search(np.array([1.0, 0, 0]))[1] == "k4"


def test_the_verifier_stages_annotate_real_tiny_model_outputs():
    """Tiny random-weight OWLv2, SAM2 and CLIP, the real MiniLM: every masked object gets a verification,
    every image concepts and negatives, and the record stays valid; an identical picture is a near-duplicate."""
    from groundmill.tests.stage_samples import build, image_sample

    samples = [image_sample(0), image_sample(0), image_sample(1)]
    samples[1].key = samples[1].record["key"] = "1" * 16
    stages = [
        build(
            "detection",
            {"detector": "owlv2", "score_threshold": 0.0, "max_boxes": 4, "classes": ["cat"]},
            "tiny",
        ),
        build("masks", {}, "tiny"),
        build("voting", {"min_iou": 0.0, "min_dice": 0.0}, "tiny"),
        build("mask_verification", {"clip_model": "tiny"}, "tiny"),
        build("exhaustivity", {"score_threshold": 0.0}, "tiny"),
        build("near_duplicates", {"threshold": 0.9999}, "tiny"),
    ]
    for stage in stages:
        stage.setup()
        stage.process(samples)
    for s in samples:
        masked = [o for g in ("objects", "floating_objects") for o in s.record[g] if "segmentation" in o]
        assert masked and all(set(o["verification"]) >= {"score", "accepted", "reasons"} for o in masked)
        assert all(0.0 <= o["stability_score"] <= 1.0 for o in masked)
        assert all("clip_agreement" in o["verification"]["features"] for o in masked)
        assert isinstance(s.record["negatives"], list) and s.record["concepts"]
        assert check_record(s.record) == []
    assert samples[1].record["near_duplicate_of"] == samples[0].key
    assert "near_duplicate_of" not in samples[0].record


class ReplayBackend:
    """Test double: answers each generate() call with the next list of texts, logging the prompts."""

    def __init__(self, rounds: list[list[str]]):
        self.rounds, self.prompts = list(rounds), []

    def generate(self, prompts, params):
        self.prompts.append(prompts)
        return [Generation(text, "stop") for text in self.rounds.pop(0)]


def test_the_vlm_judge_sees_the_drawn_mask_and_its_answer_is_retried_until_it_parses():
    from groundmill.pipeline.config import stage_params
    from groundmill.stages.mask_verification import MaskVerificationStage
    from groundmill.tests.stage_samples import image_sample

    sample = image_sample(0)  # 96x72 noise with a red block at x 20..60, y 10..50
    mask = np.zeros((72, 96), bool)
    mask[10:50, 20:60] = True
    block, elsewhere = obj(0, "red block", [20, 10, 60, 50]), obj(1, "cat", [50, 10, 90, 50])
    block["segmentation"], elsewhere["segmentation"] = (
        encode_mask(mask),
        encode_mask(np.roll(mask, 30, axis=1)),
    )
    sample.record["objects"], sample.record["floating_objects"] = [block, elsewhere], []
    params = stage_params(
        MaskVerificationStage, {"judge": True, "llm": {"backend": "http"}}, "mask_verification"
    )
    stage = MaskVerificationStage(params)
    stage.clip, stage.backend = None, ReplayBackend([["Accept.", "hmm"], ["reject"]])
    stage.process([sample])
    first, other = sample.record["objects"]
    assert first["verification"]["judge"] == "accept" and first["verification"]["accepted"]
    assert other["verification"]["judge"] == "reject" and "judge: reject" in other["verification"]["reasons"]
    assert not other["verification"]["accepted"]
    sent = stage.backend.prompts[0][0][-1]["content"]
    assert sent[0]["type"] == "image_url" and sent[0]["image_url"]["url"].startswith(
        "data:image/jpeg;base64,"
    )
    assert "Label: red block." in sent[1]["text"]
    assert len(stage.backend.prompts[1]) == 1  # only the unparsed answer was asked again


def test_the_trainer_trains_on_hard_negatives_from_engine_shards(tmp_path):
    """Engine shards whose records carry `negatives`: the referring batches hold "there is none" rows
    with empty targets, one [SEG] and one mask each, and training steps run on them."""
    import io

    import torch
    from PIL import Image

    from groundmill.model.bench import TINY
    from groundmill.model.config import load_config
    from groundmill.model.data import TaskBatches
    from groundmill.model.tokenizer import trainer_processor
    from groundmill.model.train import train
    from groundmill.schema import content_key, new_record
    from groundmill.shards import ShardWriter
    from groundmill.tests.model_fixtures import FAST, only_tasks

    writer = ShardWriter(tmp_path / "engine", name="engine-00000")
    for seed in range(2):
        img = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG")
        key = content_key(buf.getvalue())
        rec = new_record(key, {"uri": f"{seed}.jpg", "sha256": key, "bytes": 1, "format": "jpeg"},
                         {"type": "image", "ext": "jpg", "width": 64, "height": 64}, [])  # fmt: skip
        rec["objects"] = [obj(0, "dog", [8, 8, 40, 40])]
        rec["referring_expressions"] = [{"object_id": 0, "expression": "the dog", "source": "template"}]
        rec["negatives"] = ["cat", "wolf"]
        writer.add_sample(
            key, buf.getvalue(), "jpg", rec, {"uri": f"{seed}.jpg", "status": "ok", "media_type": "image"}
        )
    writer.commit()
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'engine'}}}]",
                             *FAST, *only_tasks("referring"), "data.batch_size=2", "optim.max_steps=2"])  # fmt: skip
    processor = trainer_processor(cfg)
    batch = next(iter(TaskBatches(cfg, processor)))
    seg = processor.tokenizer.convert_tokens_to_ids("[SEG]")
    assert batch["masks"].shape[0] == (batch["input_ids"] == seg).sum()
    texts = processor.tokenizer.batch_decode(batch["input_ids"])
    none_rows = [i for i, t in enumerate(texts) if "there is none" in t]
    assert none_rows and all(not torch.any(batch["masks"][i]) for i in none_rows)
    assert any(torch.any(batch["masks"][i]) for i in range(len(texts)) if i not in none_rows)
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors").exists()
