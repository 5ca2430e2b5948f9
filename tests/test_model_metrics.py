"""The metrics against hand-computed cases from each reference's definition (DAVIS, LISA, GLaMM, COCO)."""

import numpy as np
import pytest

from groundmill.model.metrics import (
    boundary_map,
    ciou_giou,
    cosine_matrix,
    davis_statistics,
    f_measure,
    gcg_miou,
    gcg_recall,
    j_and_f,
    jaccard,
    mask_ap,
    paired_mean_iou,
    recall_matches,
    summarize_jf,
)


def box(y0: int, y1: int, x0: int, x1: int, size: int = 10) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def pixel(y: int, x: int, size: int = 10) -> np.ndarray:
    return box(y, y + 1, x, x + 1, size)


EMPTY, FULL = np.zeros((10, 10), bool), np.ones((10, 10), bool)

# ---- J (DAVIS db_eval_iou) ------------------------------------------------------------------------------


def test_jaccard_edges():
    assert jaccard(EMPTY, EMPTY) == 1.0  # both empty
    assert jaccard(box(0, 2, 0, 2), EMPTY) == 0.0  # empty ground truth
    assert jaccard(EMPTY, box(0, 2, 0, 2)) == 0.0  # empty prediction
    assert jaccard(pixel(3, 3), pixel(3, 3)) == 1.0 and jaccard(pixel(3, 3), pixel(3, 4)) == 0.0
    assert jaccard(FULL, FULL) == 1.0 and jaccard(FULL, box(0, 5, 0, 10)) == 0.5
    assert jaccard(box(0, 4, 0, 2), box(0, 4, 0, 4)) == 0.5
    # Void pixels count in neither intersection nor union: a prediction spilling only into void is exact.
    assert jaccard(box(0, 4, 0, 6), box(0, 4, 0, 4), void=box(0, 10, 4, 10)) == 1.0


# ---- F (DAVIS seg2bmap + f_measure) ---------------------------------------------------------------------


def test_boundary_map_marks_pixels_differing_from_east_south_or_south_east():
    # A single pixel at (1, 1): itself (differs from its east) and its west, north and north-west
    # neighbours (whose east, south or south-east is the pixel).
    assert set(zip(*np.nonzero(boundary_map(pixel(1, 1, size=4))), strict=True)) == {
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    }


def test_boundary_map_of_full_frame_and_border_masks():
    assert not boundary_map(FULL).any()  # the image border is never boundary
    assert not boundary_map(EMPTY).any()
    # A mask filling the last column: its boundary is the column left of it, not the image border.
    right = box(0, 4, 3, 4, size=4)
    assert boundary_map(right).tolist() == box(0, 4, 2, 3, size=4).tolist()
    # The bottom-right pixel alone: its west and north neighbours; the pixel itself never is.
    assert set(zip(*np.nonzero(boundary_map(pixel(3, 3, size=4))), strict=True)) == {(2, 2), (2, 3), (3, 2)}


def test_f_measure_edges():
    assert f_measure(EMPTY, EMPTY) == 1.0  # no boundary in either: P = R = 1
    assert f_measure(EMPTY, box(2, 5, 2, 5)) == 0.0  # none predicted: P = 1, R = 0
    assert f_measure(box(2, 5, 2, 5), EMPTY) == 0.0  # none in the ground truth: P = 0, R = 1
    assert f_measure(FULL, FULL) == 1.0
    assert f_measure(FULL, box(2, 5, 2, 5)) == 0.0  # a full frame has no boundary to match
    assert f_measure(box(2, 5, 2, 5), FULL) == 0.0
    assert f_measure(pixel(4, 4), pixel(4, 4)) == 1.0


def test_f_measure_tolerance_is_ceil_of_0008_diagonal():
    # 10x10: radius ceil(0.008 * 14.1) = 1. Single pixels two columns apart: boundaries {(3,3),(3,4),(4,3),
    # (4,4)} and {(3,5),(3,6),(4,5),(4,6)}; within 1 px (disk): two of four each way -> P = R = F = 0.5.
    assert f_measure(pixel(4, 4), pixel(4, 6)) == pytest.approx(0.5)
    # 100x100: radius ceil(1.13) = 2, so a 2-px shift is a perfect match and a 10-px one is not.
    gt = box(20, 60, 20, 60, size=100)
    assert f_measure(box(22, 62, 20, 60, size=100), gt) == 1.0
    assert f_measure(box(30, 70, 20, 60, size=100), gt) < 0.6


# ---- DAVIS statistics and the video summary -------------------------------------------------------------


def test_davis_statistics_mean_recall_decay():
    # 5 frames: bounds round(linspace(1, 5, 5)) - 1 = [0..4]; bins [0:2] ... [3:5].
    m, r, d = davis_statistics([1.0, 0.4, 0.6, 0.2, 0.8])
    assert (m, r, d) == pytest.approx((0.6, 0.6, (1.0 + 0.4) / 2 - (0.2 + 0.8) / 2))
    # 3 frames: bounds [0, 1, 1, 2, 2]; first bin v[0:2], last bin v[2:3]; 0.5 is not > 0.5.
    m, r, d = davis_statistics([1.0, 0.5, 0.0])
    assert (m, r, d) == pytest.approx((0.5, 1 / 3, 0.75))
    assert davis_statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))  # a single frame: no decay


def test_video_summary_averages_sequences_not_frames():
    # Sequence A: 2 frames J 1; sequence B: 4 frames J .5, 0, 0, 0 -> J = (1 + .125) / 2, not 2.5 / 6.
    out = summarize_jf([([1.0, 1.0], [1.0, 1.0]), ([0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])])
    assert out["J"] == pytest.approx(0.5625) and out["F"] == pytest.approx(0.5)
    assert out["J&F"] == pytest.approx((0.5625 + 0.5) / 2)
    assert out["J-Recall"] == pytest.approx((1.0 + 0.0) / 2)
    # Decay, 4 frames: bounds [0, 1, 2, 2, 3] -> mean(v[0:2]) - mean(v[3:4]) = .25; 2 frames: 0.
    assert out["J-Decay"] == pytest.approx((0 + 0.25) / 2)


def test_j_and_f_scores_every_frame_of_each_sequence():
    a = box(2, 6, 2, 6)
    # Video 1: exact on both frames. Video 2: frame 1 exact, frame 2 empty vs a (J = F = 0).
    out = j_and_f([[a, a], [a, EMPTY]], [[a, a], [a, a]])
    assert (out["J"], out["F"], out["J&F"]) == (0.75, 0.75, 0.75)
    assert out["J-Recall"] == 0.75  # per sequence 1 and .5, then the mean


# ---- cIoU / gIoU (LISA) -------------------------------------------------------------------------------


def test_ciou_is_pooled_and_giou_is_smoothed_mean():
    # Sample 1: pred 4 px inside gt 8 px -> I 4, U 8. Sample 2: disjoint 2 px and 2 px -> I 0, U 4.
    out = ciou_giou([box(0, 2, 0, 2), box(0, 1, 0, 2)], [box(0, 2, 0, 4), box(5, 6, 0, 2)])
    assert out["cIoU"] == pytest.approx(4 / (12 + 1e-10), rel=1e-12)
    assert out["gIoU"] == pytest.approx((4 / (8 + 1e-5) + 0) / 2, rel=1e-12)


def test_ciou_giou_empty_and_single_pixel_edges():
    both_empty = ciou_giou([EMPTY, EMPTY], [EMPTY, EMPTY])
    assert both_empty == {"cIoU": 0.0, "gIoU": 1.0}  # every union empty: cIoU 0, each sample counts 1
    assert ciou_giou([box(0, 2, 0, 2)], [EMPTY]) == {"cIoU": 0.0, "gIoU": 0.0}  # empty ground truth
    assert ciou_giou([EMPTY], [box(0, 2, 0, 2)]) == {"cIoU": 0.0, "gIoU": 0.0}  # empty prediction
    single = ciou_giou([pixel(0, 9)], [pixel(0, 9)])  # a single pixel on the border
    assert single["gIoU"] == pytest.approx(1 / (1 + 1e-5), rel=1e-12) and single["gIoU"] < 1
    full = ciou_giou([FULL], [FULL])
    assert full["cIoU"] == pytest.approx(100 / (100 + 1e-10), rel=1e-12)
    # An empty-vs-empty sample beside a real one: the pool ignores it, the mean counts it as 1.
    mixed = ciou_giou([EMPTY, box(0, 2, 0, 2)], [EMPTY, box(0, 2, 0, 4)])
    assert mixed["cIoU"] == pytest.approx(0.5, rel=1e-9) and mixed["gIoU"] == pytest.approx(
        (1 + 4 / (8 + 1e-5)) / 2
    )


def test_ignored_pixels_are_outside_intersection_and_union():
    ignore = box(0, 10, 5, 10)
    out = ciou_giou([box(0, 2, 0, 10)], [box(0, 2, 0, 5)], [ignore])  # spills only into ignore
    assert out["cIoU"] == pytest.approx(1.0, rel=1e-9)


# ---- GCG mIoU and recall (GLaMM) ------------------------------------------------------------------------


def test_gcg_miou_stops_at_zero_iou():
    a, b, c = box(0, 4, 0, 4), box(6, 10, 6, 10), box(0, 2, 6, 10)
    # IoU (pred x gt) [[1, 0], [0, 0]]: one pair of IoU 1, then the best left is 0 -> stop: 1.0, not .5.
    assert gcg_miou([[a, c]], [[a, b]]) == 1.0
    # Image 2 predicts nothing: 0; the mean over images.
    assert gcg_miou([[a, c], []], [[a, b], [a]]) == pytest.approx(0.5)
    assert gcg_miou([], []) == 0.0


def test_gcg_miou_ties_take_the_first_in_row_major_order():
    # argmax on [[.5, .5], [.5, .2]] is (0, 0); then only .2 remains -> (.5 + .2) / 2. (0, 1) would give .5.
    assert paired_mean_iou(np.array([[0.5, 0.5], [0.5, 0.2]])) == pytest.approx(0.35)


def test_gcg_miou_empty_masks():
    a = box(0, 4, 0, 4)
    assert gcg_miou([[EMPTY]], [[a]]) == 0.0  # an empty prediction has IoU 0: no pair
    # Empty vs empty is 0/0 = NaN in GLaMM's compute_iou; np.max is then NaN and the pairing ends at once.
    assert gcg_miou([[EMPTY, a]], [[EMPTY, a]]) == 0.0


def test_recall_stops_at_the_first_failing_pair():
    # Best IoU .9 has phrase similarity .2: stop there, although the .6 pair would pass both tests.
    assert recall_matches(np.array([[0.9, 0.0], [0.0, 0.6]]), np.array([[0.2, 0.0], [0.0, 0.9]])) == 0
    assert recall_matches(np.array([[0.9, 0.0], [0.0, 0.6]]), np.array([[0.9, 0.0], [0.0, 0.9]])) == 2
    # IoU exactly at the thresholds passes (>=); below fails.
    assert recall_matches(np.array([[0.5]]), np.array([[0.5]])) == 1
    assert recall_matches(np.array([[0.49]]), np.array([[0.9]])) == 0


def test_recall_ties_and_nan():
    # Ties: argmax takes (0, 0) (similar phrases) -> counted; row 0 and column 0 zeroed -> stop at IoU 0.
    ious, sims = np.array([[0.6, 0.6], [0.6, 0.0]]), np.array([[0.9, 0.1], [0.1, 0.9]])
    assert recall_matches(ious, sims) == 1
    # A NaN IoU (empty vs empty) is argmax's pick and passes "< th" as False: GLaMM counts it.
    assert recall_matches(np.array([[np.nan]]), np.array([[0.9]])) == 1


def test_gcg_recall_over_images():
    a, b = box(0, 4, 0, 4), box(6, 10, 6, 10)
    vocab = {"a red circle": [1, 0], "the red circle": [0.9, 0.1], "a blue square": [0, 1], "a tree": [1, 1]}

    def embed(texts: list[str]) -> np.ndarray:  # test double: fixed vectors per phrase
        return np.array([vocab[t] for t in texts], float).reshape(len(texts), 2)

    preds = [([a, b], ["the red circle", "a tree"]), ([], [])]
    gts = [([a, b], ["a red circle", "a blue square"]), ([a], ["a red circle"])]
    # Image 1: IoU 1 pairs (a, a) first (similarity .99, counted), then (b, b): "a tree" vs "a blue
    # square" is cos 45 deg = .707 -> counted. Image 2 predicts nothing. Recall = 2 / 3 phrases.
    assert gcg_recall(preds, gts, embed) == pytest.approx(2 / 3)
    assert gcg_recall([([], [])], [([], [])], embed) == 0.0  # no ground-truth phrases


def test_cosine_matrix_normalises_and_keeps_zero_rows_zero():
    out = cosine_matrix(np.array([[3.0, 4.0], [0.0, 0.0]]), np.array([[6.0, 8.0]]))
    assert out.tolist() == [[pytest.approx(1.0)], [0.0]]


# ---- COCO mask AP ---------------------------------------------------------------------------------------


def test_mask_ap50_counts_true_and_false_positives():
    gts = [[box(0, 4, 0, 4)], [box(0, 4, 0, 4)]]
    assert mask_ap([([g[0]], [1.0]) for g in gts], gts)["AP50"] == pytest.approx(1.0)
    # Image 2's prediction misses: recall stops at .5 -> AP50 = .5 (101-point interpolation).
    half = [([gts[0][0]], [1.0]), ([box(6, 10, 6, 10)], [1.0])]
    assert mask_ap(half, gts)["AP50"] == pytest.approx(0.5, abs=0.01)


def test_mask_ap_ranks_instances_by_score():
    a, b, miss = box(0, 4, 0, 4), box(6, 10, 6, 10), box(0, 3, 6, 10)
    # A false positive ranked first: precision at recall .5 is 1/2, at recall 1 it is 2/3; interpolated
    # precision is 2/3 everywhere -> AP50 = .667. Ranked last, the same masks score 1.
    fp_first = mask_ap([([miss, a, b], [0.9, 0.8, 0.7])], [[a, b]])
    fp_last = mask_ap([([miss, a, b], [0.1, 0.8, 0.7])], [[a, b]])
    assert fp_first["AP50"] == pytest.approx(2 / 3, abs=0.01) and fp_last["AP50"] == pytest.approx(1.0)


def test_mask_ap_without_predictions_or_ground_truth():
    assert mask_ap([([], [])], [[box(0, 4, 0, 4)]]) == {"AP": 0.0, "AP50": 0.0}
    assert np.isnan(mask_ap([([box(0, 4, 0, 4)], [1.0])], [[]])["AP50"])
