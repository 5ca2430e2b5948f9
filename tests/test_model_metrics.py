"""The trainer's metrics against hand-computed cases."""

import numpy as np
import pytest

from groundmill.model.metrics import ciou_giou, f_measure, gcg_miou, iou, j_and_f, mask_ap, mask_recall


def box(y0: int, y1: int, x0: int, x1: int, size: int = 10) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_ciou_is_pooled_and_giou_is_mean():
    # Sample 1: pred 4 px inside gt 8 px -> I 4, U 8, IoU .5. Sample 2: disjoint 2 px and 2 px -> I 0, U 4.
    preds = [box(0, 2, 0, 2), box(0, 1, 0, 2)]
    gts = [box(0, 2, 0, 4), box(5, 6, 0, 2)]
    ciou, giou = ciou_giou(preds, gts)
    assert ciou == pytest.approx(4 / 12)
    assert giou == pytest.approx((0.5 + 0.0) / 2)


def test_iou_of_two_empty_masks_is_one():
    assert iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_f_measure_exact_shifted_and_empty():
    gt = box(2, 8, 2, 8, size=100)
    assert f_measure(gt, gt) == 1.0
    # 100x100 -> tolerance ceil(0.008 * 141.4) = 2 px: a 1-px shift is still a perfect boundary match.
    assert f_measure(box(3, 9, 2, 8, size=100), gt) == 1.0
    assert f_measure(box(50, 60, 50, 60, size=100), gt) == 0.0
    assert f_measure(np.zeros((100, 100), bool), gt) == 0.0


def test_j_and_f_averages_frames_then_videos():
    gt = box(0, 4, 0, 4)
    half = box(0, 4, 0, 2)  # IoU .5 with gt
    video_a = ([gt, gt], [gt, gt])  # J 1, F 1
    video_b = ([half, np.zeros_like(gt)], [gt, gt])  # J (.5 + 0) / 2
    out = j_and_f([video_a[0], video_b[0]], [video_a[1], video_b[1]])
    assert out["J"] == pytest.approx((1 + 0.25) / 2)
    assert out["J&F"] == pytest.approx((out["J"] + out["F"]) / 2)


def test_mask_ap50_counts_true_and_false_positives():
    gts = [[box(0, 4, 0, 4)], [box(0, 4, 0, 4)]]
    perfect = [([g[0]], [1.0]) for g in gts]
    assert mask_ap(perfect, gts)["AP50"] == pytest.approx(1.0)
    # Image 2's prediction misses: recall stops at .5 -> AP50 = .5 (101-point interpolation).
    half = [([gts[0][0]], [1.0]), ([box(6, 10, 6, 10)], [1.0])]
    assert mask_ap(half, gts)["AP50"] == pytest.approx(0.5, abs=0.01)


def test_gcg_miou_greedy_pairs_and_missing_predictions():
    a, b = box(0, 4, 0, 4), box(6, 10, 6, 10)
    # Image 1: preds [b, a-left-half] vs gts [a, b]: pairs (b,b)=1, (half,a)=.5 -> .75. Image 2: nothing -> 0.
    preds = [[b, box(0, 4, 0, 2)], []]
    gts = [[a, b], [a]]
    assert gcg_miou(preds, gts) == pytest.approx((0.75 + 0.0) / 2)


def test_mask_recall_needs_both_iou_and_text_similarity():
    a, b = box(0, 4, 0, 4), box(6, 10, 6, 10)
    vocab = {"a red circle": [1, 0], "the red circle": [0.9, 0.1], "a blue square": [0, 1]}

    def embed(texts: list[str]) -> np.ndarray:
        v = np.array([vocab[t] for t in texts], float)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    # Mask a matches with a similar phrase (counts); mask b matches with the wrong phrase (does not).
    preds = [([a, b], ["the red circle", "a red circle"])]
    gts = [([a, b], ["a red circle", "a blue square"])]
    assert mask_recall(preds, gts, embed) == pytest.approx(1 / 2)
