"""X2SAM's generic head: Hungarian matching finds the permutation, and the head trains and is scored
with per-category COCO mask AP on engine object labels."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groundmill.model.bench import TINY
from groundmill.model.config import LossConfig, load_config
from groundmill.model.eval import evaluate
from groundmill.model.generic import category_map
from groundmill.model.losses import generic_loss
from groundmill.model.predict import load_for_eval
from groundmill.model.synthetic import write_split
from groundmill.model.train import train
from groundmill.tests.model_fixtures import FAST


def test_matching_pairs_each_instance_with_the_query_that_predicts_it():
    masks = torch.zeros(3, 16, 16)
    for k in range(3):
        masks[k, 4 * k : 4 * k + 4, 2:10] = 1
    classes, rows = torch.tensor([0, 1, 0]), torch.zeros(3, dtype=torch.long)
    perm = [4, 0, 2]  # query perm[k] predicts instance k
    mask_logits = torch.full((5, 16, 16), -12.0)
    class_logits = torch.full((5, 3), -6.0)
    class_logits[:, 2] = 6.0  # the other queries: no object
    for k, q in enumerate(perm):
        mask_logits[q][masks[k] > 0] = 12.0
        class_logits[q] = -6.0
        class_logits[q, classes[k]] = 6.0
    w = LossConfig()
    matched = generic_loss([(class_logits, mask_logits)], masks, classes, rows, w)
    assert matched["generic_bce"] < 1e-3 and matched["generic_dice"] < 0.05 and matched["cls"] < 1e-3
    shuffled = generic_loss([(class_logits, mask_logits[[1, 2, 3, 4, 0]])], masks, classes, rows, w)
    assert shuffled["loss"] > matched["loss"] + 1  # the matching cannot undo a wrong class/mask pairing


def test_category_map_is_per_category_coco_ap():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[:4], b[4:] = True, True
    gts = [[("cat", a), ("dog", b)]]
    perfect = [(["cat", "dog"], (np.array([0, 1]), np.array([0.9, 0.8]), np.stack([a, b])))]
    swapped = [(["cat", "dog"], (np.array([1, 0]), np.array([0.9, 0.8]), np.stack([a, b])))]
    assert category_map(perfect, gts)["AP"] > 0.999 and category_map(swapped, gts)["AP"] == 0.0


def test_generic_head_trains_on_object_labels_and_reports_mask_ap(tmp_path):
    write_split(tmp_path / "train", images=12, videos=2, seed=5)
    write_split(tmp_path / "val", images=3, videos=1, seed=6)
    tasks = "data.tasks={referring: 1, semantic: 0, gcg: 0, interactive: 0, vgd: 0, generic: 2, video_referring: 0, video_object: 0}"
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'train'}}}]",
                             f"data.val=[{{path: {tmp_path / 'val'}}}]", *FAST, tasks, "decoder.queries=8",
                             "optim.max_steps=3"])  # fmt: skip
    ckpt = train(cfg)
    results = evaluate(cfg, ckpt, gcg_limit=1)
    assert results["generic"]["n"] == 3 and results["generic"]["categories"] >= 3
    assert 0 <= results["generic"]["AP"] <= 1


def test_query_seg_head_gives_each_seg_the_query_that_scores_highest_against_it(tmp_path):
    write_split(tmp_path / "train", images=12, videos=2, seed=5)
    write_split(tmp_path / "val", images=3, videos=1, seed=6)
    with pytest.raises(ValueError, match="decoder.seg_head=queries needs the query head"):
        load_config(TINY, ["decoder.seg_head=queries"])
    tasks = "data.tasks={referring: 1, semantic: 0, gcg: 1, interactive: 1, vgd: 0, video_referring: 1, video_object: 0}"
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'train'}}}]",
                             f"data.val=[{{path: {tmp_path / 'val'}}}]", *FAST, tasks, "decoder.queries=8",
                             "decoder.seg_head=queries", "optim.max_steps=3"])  # fmt: skip
    ckpt = train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["seg_cls"]) and np.isfinite(r["dice"]) for r in logged)
    results = evaluate(cfg, ckpt, gcg_limit=1)
    assert 0 <= results["referring"]["cIoU"] <= 1 and 0 <= results["video_referring"]["J&F"] <= 1
    # The selection itself: per [SEG] and frame, the mask of the query most likely to be that [SEG]'s object.
    model, _ = load_for_eval(cfg, ckpt)
    masks = torch.randn(2, 8, 2, 32, 32)  # two [SEG]s, 8 queries, a clip of 2 frames
    class_logits = torch.zeros(2, 8, 2)
    class_logits[0, 5, 0] = class_logits[1, 2, 0] = 4.0
    picked = model.selected_masks(list(zip(class_logits, masks, strict=True)))
    assert picked.shape == (2, 2, 128, 128)
    expected = F.interpolate(masks[[0, 1], [5, 2]], size=(128, 128), mode="bilinear")
    torch.testing.assert_close(picked, expected)
