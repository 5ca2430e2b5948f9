"""Benchmark scoring (protocols, resizing back, DAVIS label maps, GCG), captions, phrase embedders, report."""

import logging
import shutil

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from groundmill.model import metrics
from groundmill.model.eval import components, instances_from_logits
from groundmill.model.eval_bench import (
    exclusive_masks,
    resize_logits,
    score_gcg,
    score_referring,
    score_video,
)
from groundmill.model.eval_report import format_tables
from groundmill.model.evalsets import read_layout
from groundmill.model.metrics import caption_scores
from groundmill.model.phrases import load_embedder
from groundmill.tests.benchmark_files import (
    box,
    write_davis,
    write_grandf,
    write_reasonseg,
    write_refcoco,
    write_rvos,
)

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer and METEOR need Java"
)


def logits(mask: np.ndarray, value: float = 2.0) -> np.ndarray:
    return np.where(mask, value, -value).astype(np.float32)


class ScriptedSegmenter:
    """Test double for eval_bench.Segmenter: returns scripted mask logits instead of running a model."""

    def __init__(self, refer=None, track=None, caption=None):
        self._refer, self._track, self._caption = refer, track, caption

    def refer(self, image, texts):
        return [self._refer[t] for t in texts]

    def track(self, item):
        return self._track(item)

    def caption(self, image):
        return self._caption


def test_resize_logits_is_bilinear_on_logits():
    up = resize_logits(np.array([[1.0, -1.0], [1.0, -1.0]]), (4, 4))
    assert (up > 0).tolist() == [[True, True, False, False]] * 4
    assert resize_logits(np.ones((2, 3, 3)), (6, 6)).shape == (2, 6, 6)


def test_referring_protocol_pools_per_split(tmp_path):
    masks = write_refcoco(tmp_path)
    empty = np.zeros((20, 30), bool)
    seg = ScriptedSegmenter(refer={"the left box": logits(masks[11]), "small box": logits(empty),
                                   "box on the right": logits(masks[12])})  # fmt: skip
    out = score_referring(seg, read_layout("refcoco", tmp_path / "refcoco"))
    # val: a perfect 40-px sample and an empty prediction -> cIoU 40 / 80, gIoU (40 / (40 + 1e-5) + 0) / 2.
    assert out["val"]["cIoU"] == pytest.approx(0.5) and out["val"]["n"] == 2
    assert out["val"]["gIoU"] == pytest.approx(40 / (40 + 1e-5) / 2)
    assert out["testA"]["cIoU"] == pytest.approx(1.0) and out["testA"]["n"] == 1


def test_referring_predictions_are_resized_to_the_ground_truth(tmp_path):
    write_refcoco(tmp_path)
    left = np.zeros((10, 15), bool)
    left[:, :5] = True  # at half resolution: columns 0..9 of the 30-px-wide ground truth
    seg = ScriptedSegmenter(
        refer={t: logits(left) for t in ("the left box", "small box", "box on the right")}
    )
    out = score_referring(seg, read_layout("refcoco", tmp_path / "refcoco"))
    # Ann 11 covers rows 3..7, columns 2..9: inside the upsampled left third (20 x 10 = 200 px) -> 40 / 200.
    assert out["val"]["cIoU"] == pytest.approx(40 / 200)


def test_reasonseg_ignore_pixels_do_not_count(tmp_path):
    write_reasonseg(tmp_path)
    # val: predict the whole image; all of it but the target and the right strip is 'ignore'.
    seg = ScriptedSegmenter(refer={"what holds the tea?": logits(np.ones((20, 30), bool)),
                                   "the thing you would sit on after a long walk": logits(box(16, 16, 2, 7, 2, 11))})  # fmt: skip
    out = score_referring(seg, read_layout("reasonseg", tmp_path))
    assert out["val"]["cIoU"] == pytest.approx(
        25 / (25 + 20 * 10)
    )  # 5x5 target; the 10-px strip is not ignored
    assert (
        out["test"]["cIoU"] == pytest.approx(1.0) and out["test/long"]["n"] == 1 and "test/short" not in out
    )


def test_davis_label_map_and_excluded_frames(tmp_path):
    labels = write_davis(tmp_path)
    (item,) = read_layout("davis17", tmp_path)

    def track(it):
        # Object 1: exact on the scored frames, empty on the first and last (excluded). Object 2: its own
        # mask confidently plus object 1's weakly; the label map gives the overlap to object 1.
        one = np.stack([logits(lab == 1) if 0 < t < 3 else logits(lab < 0) for t, lab in enumerate(labels)])
        two = np.stack([np.where(lab == 2, 2.0, np.where(lab == 1, 0.5, -2.0)) for lab in labels])
        return [one, two]

    out = score_video(ScriptedSegmenter(track=track), [item])["val"]
    assert (out["J"], out["F"], out["J&F"], out["n"]) == (1.0, 1.0, 1.0, 2)
    assert out["J-Recall"] == 1.0 and out["J-Decay"] == 0.0


def test_exclusive_masks_give_each_pixel_to_the_most_confident_object():
    up = np.array([[[2.0, -1.0, 0.5]], [[1.0, 3.0, -0.5]]])  # 2 objects, 1x3 pixels
    assert exclusive_masks(up).tolist() == [[[True, False, True]], [[False, True, False]]]


def test_video_referring_averages_expressions(tmp_path):
    labels = write_rvos(tmp_path)
    moving = np.stack([logits(lab == 1) for lab in labels])
    nothing = np.stack([logits(lab < 0) for lab in labels])
    seg = ScriptedSegmenter(
        track=lambda it: [moving if it.targets[0].text == "the moving square" else nothing]
    )
    out = score_video(seg, read_layout("refytvos", tmp_path))["valid"]
    # Expression 0 exact (J = F = 1), expression 1 predicted empty (J = F = 0 on every frame).
    assert (out["J"], out["F"], out["J&F"], out["n"]) == (0.5, 0.5, 0.5, 2)


def test_gcg_scores_and_says_when_captions_cannot_be_scored(tmp_path, monkeypatch):
    gt = write_grandf(tmp_path)
    miss = box(24, 32, 14, 22, 0, 10)
    seg = ScriptedSegmenter(
        caption=("a red kite above grass", ["a red kite", "grass"], np.stack([logits(gt[0]), logits(miss)]))
    )
    vectors = {
        "A red kite": [1.0, 0.0],
        "a red kite": [1.0, 0.1],
        "a green field": [0.0, 1.0],
        "grass": [0.3, 1.0],
    }

    def embed(texts):  # test double: fixed phrase vectors
        return np.array([vectors[t] for t in texts]).reshape(len(texts), 2)

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # as without Java
    out = score_gcg(seg, read_layout("grandf", tmp_path), embed)["val"]
    # Pred 1 = phrase 1's mask, pred 2 misses: mIoU pairs only the IoU-1 pair; recall stops at the IoU-0
    # pair after one match (1 of 2 phrases); AP50: precision 1 up to recall .5, then 0 -> 51/101.
    assert out["mIoU"] == 1.0 and out["recall"] == 0.5 and out["n"] == 1
    assert out["AP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert "Java" in out["captions_unavailable"] and "METEOR" not in out


@needs_java
def test_caption_scores_follow_the_ptb_tokenizer():
    refs = {1: ["a red kite flying over the beach"], 2: ["two dogs run on the green grass"]}
    raw = caption_scores(
        {1: "A red kite, flying over the beach!", 2: "Two dogs run on the green grass."}, refs
    )
    clean = caption_scores(
        {1: "a red kite flying over the beach", 2: "two dogs run on the green grass"}, refs
    )
    assert raw == pytest.approx(clean)  # case and punctuation are removed before scoring
    assert clean["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and clean["ROUGE-L"] == pytest.approx(1.0)
    assert clean["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D of exact captions: 10 x cosine 1
    assert clean["METEOR"] == pytest.approx(1.0)


def tiny_bert(path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "kite", "green", "field"]
    (path / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    BertModel(cfg).eval().save_pretrained(path)


def test_bert_embedder_is_the_mean_over_all_tokens(tmp_path):
    tiny_bert(tmp_path / "bert")
    embed, name = load_embedder(str(tmp_path / "bert"))
    assert name == str(tmp_path / "bert")
    tok, model = (
        BertTokenizerFast.from_pretrained(tmp_path / "bert"),
        BertModel.from_pretrained(tmp_path / "bert"),
    )
    with torch.no_grad():
        enc = tok("a red kite", return_tensors="pt")  # [CLS] a red kite [SEP]
        expected = model(**enc).last_hidden_state[0].mean(0).numpy()
    out = embed(["a red kite", "green field"])
    assert out.shape == (2, 8) and np.allclose(out[0], expected, atol=1e-6)


def test_unloadable_embedder_falls_back_to_minilm_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        embed, name = load_embedder(str(tmp_path / "no-such-model"))
    assert "fallback" in name and "MiniLM" in name and "could not be loaded" in caplog.text
    v = embed(["a red kite", "a red kite", "an old bicycle"])
    assert v.shape == (3, 384) and v[0] @ v[1] == pytest.approx(1.0, abs=1e-5) and v[0] @ v[2] < 0.9


def test_vgd_instances_are_connected_components_scored_by_probability():
    lg = np.full((6, 6), -4.0)
    lg[0:2, 0:2] = 4.0
    lg[4:6, 3:6] = 1.0
    masks, scores = instances_from_logits(lg)
    assert [m.sum() for m in masks] == [4, 6]
    assert scores == pytest.approx([1 / (1 + np.exp(-4)), 1 / (1 + np.exp(-1))])
    assert components(np.zeros((3, 3), bool)) == []
    diagonal = np.eye(3, dtype=bool)  # 4-connectivity: diagonal pixels are separate instances
    assert len(components(diagonal)) == 3


def test_report_table_rows_per_task():
    report = {"datasets": {
        "refcoco": {"protocol": "LISA", "splits": {"val": {"cIoU": 0.5, "gIoU": 0.25, "n": 2},
                                                   "testA": {"cIoU": 1.0, "gIoU": 1.0, "n": 1}}},
        "davis17": {"protocol": "DAVIS", "splits": {"val": {"J&F": 0.75, "J": 0.7, "F": 0.8, "n": 3}}},
        "grandf": {"protocol": "GLaMM", "phrase_embedder": "bert-base-uncased",
                   "splits": {"val": {"METEOR": 0.1, "CIDEr": 0.2, "AP50": 0.3, "mIoU": 0.4, "recall": 0.5, "n": 4}}},
    }}  # fmt: skip
    text = format_tables(report)
    ciou = text.split("Referring segmentation, cIoU\n")[1].splitlines()
    assert ciou[0].split() == ["dataset", "val", "testA"] and ciou[2].split() == ["refcoco", "50.0", "100.0"]
    video = text.split("Video segmentation\n")[1].splitlines()
    assert video[0].split() == ["dataset", "split", "J&F", "J", "F", "n"]
    assert video[2].split() == ["davis17", "val", "75.0", "70.0", "80.0", "3"]
    gcg = text.split("Grounded conversation generation\n")[1].splitlines()
    assert gcg[2].split() == ["grandf", "val", "10.0", "20.0", "30.0", "40.0", "50.0", "4"]
    assert "[grandf] phrase embedder: bert-base-uncased" in text and "[davis17] DAVIS" in text
