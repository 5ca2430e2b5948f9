"""CASS stuff segmentation and SAM2 automatic masks: the spectral math on small matrices with known
answers, then both stages with their real model classes (tiny open_clip, tiny DINO ViTModel, tiny
SAM2) on odd images, and coverage."""

import numpy as np
import pytest
import torch

from groundmill.schema import annotate_coverage, check_record, decode_mask, encode_mask, frame_coverage
from groundmill.stages import spectral
from groundmill.stages.auto_masks import SOURCE, rle_ious, uncovered
from groundmill.stages.cass import last_key_projection, tiny_dino, working_size
from groundmill.stages.stuff import competing_labels, next_free_id, stuff_regions
from groundmill.tests.media_factory import awkward_images
from groundmill.tests.stage_samples import build, image_sample, video_sample

# --- the math --------------------------------------------------------------------------------------


def test_key_graphs_are_scaled_gram_matrices():
    keys = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])  # 1 head, 2 tokens, d=4
    graph = spectral.key_graphs(keys)
    assert torch.allclose(graph, torch.tensor([[[0.5, 0.0], [0.0, 2.0]]]))  # K K^T / sqrt(4)


def test_top_eigenvalues_of_a_diagonal_and_a_rank_one_graph():
    diag = torch.diag(torch.tensor([1.0, 5.0, 3.0]))
    ones = torch.ones(3, 3)  # eigenvalues 3, 0, 0
    values = spectral.top_eigenvalues(torch.stack([diag, ones]), k=2)
    assert torch.allclose(values, torch.tensor([[5.0, 3.0], [3.0, 0.0]], dtype=torch.float64), atol=1e-9)


def test_spectral_distribution_and_wasserstein_distance():
    dist = spectral.spectral_distribution(torch.tensor([3.0, 4.0]))  # L2 -> [.6, .8] -> L1 -> [3/7, 4/7]
    assert torch.allclose(dist, torch.tensor([3 / 7, 4 / 7]))
    assert spectral.wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.0  # order-free
    assert spectral.wasserstein_1d(torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5])) == pytest.approx(0.6)


def test_complementary_matching_maximises_distance():
    distances = np.array([[0.1, 0.9, 0.2], [0.8, 0.3, 0.1], [0.2, 0.1, 0.7]])
    assert spectral.complementary_matching(distances) == [(0, 1), (1, 0), (2, 2)]
    # more CLIP heads than DINO heads: the surplus CLIP head stays unmatched
    assert spectral.complementary_matching(np.array([[0.1], [0.5], [0.3]])) == [(1, 0)]


def test_identical_heads_have_zero_spectral_distance():
    graphs = spectral.key_graphs(torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)))
    distances = spectral.spectral_distances(graphs, graphs, k=4)
    assert np.allclose(np.diag(distances), 0.0)
    assert distances[0, 1] > 0


def test_energy_rank_and_eigenscaling():
    s = torch.tensor([6.0, 3.0, 1.0])  # cumulative energy .6, .9, 1.0
    assert spectral.energy_rank(s, 0.95) == 3
    assert spectral.energy_rank(s, 0.9) == 2
    assert spectral.energy_rank(s, 0.5) == 1
    # [1, 6] -> [0.5, 9]: 3 -> (3 - 1) / 5 * 8.5 + 0.5
    assert torch.allclose(spectral.eigenscale(s), torch.tensor([9.0, 3.9, 0.5]))
    assert torch.equal(spectral.eigenscale(torch.tensor([2.0, 2.0])), torch.tensor([2.0, 2.0]))


def test_low_rank_graph_of_a_rank_one_graph_keeps_it_off_the_diagonal():
    v = torch.tensor([1.0, 2.0, 3.0])
    graph = torch.outer(v, v)  # one singular value: eigenscale maps [s, s] to itself
    approx = spectral.low_rank_graph(graph, 0.95)
    expected = graph.clone()
    expected.fill_diagonal_(0)
    assert torch.allclose(approx, expected, atol=1e-5)


def test_rescale_range_and_distillation_weights():
    source, target = torch.tensor([0.0, 5.0, 10.0]), torch.tensor([-1.0, 1.0])
    assert torch.allclose(spectral.rescale_range(source, target), torch.tensor([-1.0, 0.0, 1.0]))
    clip = spectral.key_graphs(torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(spectral.distill_graphs(clip, clip, scale_factor=0.0), clip)  # lambda 0: CLIP alone
    mixed = spectral.distill_graphs(clip, clip.flip(0), scale_factor=10.0)
    assert not torch.allclose(mixed, clip)
    assert mixed.min() >= clip.min() - 1e-5 and mixed.max() <= clip.max() + 1e-5  # a convex blend in range


def test_gaussian_neighbourhood():
    bias = spectral.gaussian_neighbourhood(2, 2, std=1.0)  # patches (0,0) (0,1) (1,0) (1,1)
    assert torch.allclose(torch.diag(bias), torch.ones(4))
    assert bias[0, 1] == pytest.approx(np.exp(-0.5))
    assert bias[0, 3] == pytest.approx(np.exp(-1.0))  # distance^2 = 2


def test_class_clusters_group_near_duplicate_texts():
    texts = np.array([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0]])
    assert len(set(spectral.class_clusters(texts, 0.0))) == 3
    clusters = spectral.class_clusters(texts, 0.1)
    assert clusters[0] == clusters[1] != clusters[2]


def test_presence_adjusts_the_most_present_class_of_each_cluster():
    patches = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.9], [-1.0, 0.0]]), dim=1)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    presence = torch.tensor([0.2, 0.9])
    same = spectral.presence_adjusted_texts(patches, texts, presence, np.array([0, 0]), weight=0.5)
    assert torch.equal(same[0], texts[0])  # not the cluster's most present class: unchanged
    expected = torch.nn.functional.normalize(
        0.5 * texts[1] + 0.5 * patches[:2].mean(0) / patches[:2].mean(0).norm(), dim=0
    )
    assert torch.allclose(same[1], expected)
    scores = spectral.presence_scores(patches, texts, presence, gamma=1.0)
    assert torch.allclose(scores, presence.expand(3, 2))  # gamma 1: the prior alone


def test_windows_and_working_size():
    assert spectral.window_starts(64, 64, 32) == [0]
    assert spectral.window_starts(100, 64, 32) == [0, 32, 36]
    assert working_size(10, 10, 336, 224) == (336, 336)
    assert working_size(1, 2000, 64, 64) == (64, 256)  # extreme aspect: the long side is capped
    assert working_size(300, 100, 50, 64) == (192, 64)


def test_stuff_regions_keep_stuff_classes_only():
    labels = np.array([[0, 0, 1], [0, 2, 2], [2, 2, 2]])
    probs = np.full((3, 3), 0.9)
    probs[0, 0] = 0.1
    names = competing_labels(["sky", "grass"], ["person", "grass"])
    assert names == ["sky", "grass", "person"]
    regions = stuff_regions(labels, probs, names, num_stuff=2, min_score=0.5, min_area_frac=0.0, first_id=7)
    assert [(r["id"], r["label"], r["area"]) for r in regions] == [(7, "sky", 2), (8, "grass", 1)]
    assert decode_mask(regions[0]["segmentation"]).sum() == 2
    assert stuff_regions(labels, probs, names, 2, 0.5, 0.2, 0) == [r | {"id": 0} for r in regions[:1]]


def test_uncovered_masks_and_coverage():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:, :1] = True
    ious = rle_ious([encode_mask(a), encode_mask(b)], [encode_mask(a)])
    assert np.allclose(ious, [[1.0], [2 / 10]])  # b shares 2 of the 10 pixels a and b cover
    assert uncovered(ious, max_iou=0.5) == [1]
    assert uncovered(rle_ious([encode_mask(a)], []), max_iou=0.5) == [0]  # nothing known: all new
    frame = {
        "objects": [{"id": 0, "segmentation": encode_mask(a)}],
        "stuff": [{"id": 1, "segmentation": encode_mask(b)}],
    }
    assert frame_coverage(frame, 4, 4) == pytest.approx(10 / 16)  # union, not sum
    assert frame_coverage({}, 4, 4) == 0.0
    assert next_free_id(frame) == 2


# --- the stages with real model classes ------------------------------------------------------------


def test_tiny_dino_key_projection_is_hooked():
    assert last_key_projection(tiny_dino()) is not None


@pytest.fixture(scope="module")
def stuffed():
    samples = [image_sample(1), image_sample(2, (64, 80)), video_sample()]
    for sample in samples:
        for view in sample.views():
            view.record.update(objects=[], floating_objects=[])
    auto = build(
        "auto_masks",
        {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "max_iou": 1.01},
        "tiny",
    )
    auto.setup()
    auto.process(samples)
    stuff = build("stuff", {"short_side": 64, "min_score": 0.0, "min_area_frac": 0.0}, "tiny")
    stuff.setup()
    stuff.process(samples)
    return samples, auto, stuff


def test_stages_write_stuff_auto_objects_and_coverage(stuffed):
    samples, auto, stuff = stuffed
    for sample in samples:
        coverage = annotate_coverage(sample.record)
        assert check_record(sample.record) == []
        assert 0.0 < coverage <= 1.0
        for view in sample.views():
            frame = view.record
            assert frame["floating_objects"] and all(
                o["segmentation_source"] == SOURCE for o in frame["floating_objects"]
            )
            ids = [o["id"] for o in frame["floating_objects"]] + [s["id"] for s in frame["stuff"]]
            assert len(ids) == len(set(ids))  # stuff ids continue after the objects'
            for region in frame["stuff"]:
                assert region["label"] in stuff.names[: stuff.num_stuff]
                assert decode_mask(region["segmentation"]).sum() == region["area"] > 0
    assert stuff.provenance()["random_weights"] and stuff.provenance()["dino"] == "tiny"


def test_stuff_on_awkward_images(stuffed):
    """1-pixel, extreme-aspect and grayscale pictures (normalised to RGB) segment at their own size."""
    _, auto, stuff = stuffed
    for name, data in awkward_images().items():
        sample = image_sample(0)
        sample.data = data
        image = sample.image(0)
        sample.record["media"].update(width=image.width, height=image.height)
        sample.record.update(objects=[], floating_objects=[])
        auto.process([sample])
        stuff.process([sample])
        annotate_coverage(sample.record)
        assert check_record(sample.record) == [], name
        labels = (
            decode_mask(sample.record["floating_objects"][0]["segmentation"])
            if sample.record["floating_objects"]
            else None
        )
        assert labels is None or labels.shape == (image.height, image.width)


def test_no_stuff_when_nothing_is_confident(stuffed):
    _, _, stuff = stuffed
    sample = image_sample(3)
    stuff.params.min_score = 1.01  # no pixel is that probable
    try:
        stuff.process([sample])
    finally:
        stuff.params.min_score = 0.0
    assert sample.record["stuff"] == []
    assert annotate_coverage(sample.record) == 0.0
