"""The x2sam stage on a real checkpoint of the tiny trainer config (a few steps on synthetic shards):
its masks are the trainer's own predictions (model/predict.py) at the stored image's size, and the
prefer_masks rule swaps SAM2's masks only where the configured score says so."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groundmill.model.config import load_config
from groundmill.model.predict import load_for_eval, predict_present, presence
from groundmill.model.synthetic import write_split
from groundmill.model.tasks import ANSWER, NO_TARGET_ANSWER, QUESTIONS
from groundmill.model.train import train
from groundmill.schema import check_record, decode_mask, encode_mask
from groundmill.shards import SHARDS_DIR, iter_shard
from groundmill.stages.base import ModelSpec, Sample
from groundmill.stages.prefer_masks import PreferMasks
from groundmill.stages.x2sam import X2SamSegmentation, queries
from groundmill.tests.model_fixtures import FAST

TINY = Path(__file__).resolve().parents[1] / "manifests" / "train_tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("x2sam")
    write_split(root / "train", images=12, videos=0, seed=5)
    cfg = load_config(TINY, [f"out_dir={root / 'run'}", f"data.train=[{{path: {root / 'train'}}}]",
                             "data.val=[]", "optim.max_steps=2", *FAST])  # fmt: skip
    return train(cfg)


def _synthetic_sample(root: Path) -> Sample:
    """One synthetic scene as the engine would hand it to a stage: stored PNG bytes, its record."""
    write_split(root, images=1, videos=0, seed=9)
    [(key, files)] = [kv for tar in (root / SHARDS_DIR).glob("*.tar") for kv in iter_shard(tar)]
    record = json.loads(files["json"])
    buf = io.BytesIO()
    Image.open(io.BytesIO(files["png"])).resize((96, 80)).save(buf, format="PNG")  # not the model's size
    record["media"].update(width=96, height=80, ext="png")
    for obj in record["objects"]:
        obj["segmentation"] = encode_mask(
            np.asarray(Image.fromarray(decode_mask(obj["segmentation"])).resize((96, 80)))
        )
    record.pop("gcg")  # its masks keep the old size; the stage reads only its phrases (kept below)
    return Sample(uri="x.png", key=key, media_type="image", data=buf.getvalue(), frames=[], record=record)


def test_x2sam_masks_are_the_checkpoints_predictions_at_image_size(checkpoint, tmp_path):
    sample = _synthetic_sample(tmp_path / "scene")
    sources, phrases = ["referring", "labels"], ["blue square"]
    asked = queries(sample.record, sources, phrases)
    assert {q.kind for q in asked} == {"referring", "labels", "phrases"}

    cfg = load_config(checkpoint / "config.yaml")
    model, processor = load_for_eval(cfg, checkpoint)
    size = cfg.vision.image_size
    frames = [np.asarray(sample.image(0).resize((size, size)))]
    rows = [{"question": QUESTIONS["referring"].format(q.text), "answer": ANSWER,
             "masks": [[np.zeros((size, size), np.float32)]], "frames": frames} for q in asked]  # fmt: skip
    found = predict_present(model, rows, processor, cfg, torch.device("cpu"))
    probs = [1 / (1 + np.exp(-logits[0, 0])) for logits, _ in found]
    present = [p for _, p in found]
    # A threshold the checkpoint's probabilities cross: a 2-step model's may all lie below 0.5; and a
    # presence bar some texts miss, so the gate is seen to drop them.
    threshold = float(np.quantile(np.stack(probs), 0.9))
    min_presence = float(np.median(present))
    params = X2SamSegmentation.Params(
        sources=sources, phrases=phrases, mask_threshold=threshold, min_score=0.0, min_presence=min_presence
    )
    stage = X2SamSegmentation(params, ModelSpec(id=str(checkpoint), device="cpu"))
    stage.setup()
    stage.process([sample])
    expected = {
        q.text: np.asarray(Image.fromarray(p > threshold).resize((96, 80), Image.NEAREST))
        for q, p, there in zip(asked, probs, present, strict=True)
        if there >= min_presence
    }
    assert len(expected) < len(asked)  # the presence gate dropped some texts
    entries = {e["text"]: e for e in sample.record["x2sam"]}
    assert entries, "no text got a mask: the comparison below would test nothing"
    assert entries.keys() == {t for t, m in expected.items() if m.any()}
    for text, entry in entries.items():
        assert np.array_equal(decode_mask(entry["segmentation"]), expected[text])
        assert entry["segmentation_source"] == "x2sam" and threshold <= entry["score"] <= 1.0
    assert check_record(sample.record) == []
    assert stage.provenance()["checkpoint_step"] == 2


def test_presence_compares_the_two_answers_first_tokens_where_the_answer_starts(checkpoint):
    tok = load_for_eval(load_config(checkpoint / "config.yaml"), checkpoint)[1].tokenizer
    yes, no = (tok(a, add_special_tokens=False)["input_ids"][0] for a in (ANSWER, NO_TARGET_ANSWER))
    labels = torch.full((2, 6), -100)
    labels[0, 3:], labels[1, 2:5] = 7, 7  # answers start at positions 3 and 2
    logits = torch.zeros(2, 6, len(tok))
    logits[0, 2, yes], logits[1, 1, no] = 3.0, 3.0  # row 0 says "it is", row 1 "there is none"
    logits[0, 1, no], logits[1, 2, yes] = 9.0, 9.0  # off by one: must not be read
    p = presence(logits, labels, tok)
    assert p[0] == pytest.approx(1 / (1 + np.exp(-3.0))) and p[1] == pytest.approx(1 / (1 + np.exp(3.0)))


def _frame(scores: list[float | None]) -> dict:
    sam2 = encode_mask(np.eye(8, dtype=bool))
    objects = []
    for i, s in enumerate(scores):
        obj = {"id": i, "segmentation": sam2, "segmentation_source": "SAM2"}
        if s is not None:
            obj["verification"] = {"score": s, "accepted": s >= 0.5, "reasons": []}
        objects.append(obj)
    full = encode_mask(np.ones((8, 8), bool))
    x2sam = [{"kind": "labels", "text": f"o{i}", "object_ids": [i], "segmentation": full,
              "segmentation_source": "x2sam", "score": 0.9} for i in range(len(scores))]  # fmt: skip
    x2sam.append({"kind": "phrases", "text": "all", "object_ids": [0, 1], "segmentation": full,
                  "segmentation_source": "x2sam", "score": 1.0})  # fmt: skip
    return {"objects": objects, "x2sam": x2sam}


def test_prefer_masks_replaces_only_where_the_score_is_below_the_bar():
    frame = _frame([0.2, 0.8, None])
    PreferMasks(PreferMasks.Params(replace_below=0.5, min_x2sam_score=0.6)).choose(frame)
    sources = [o["segmentation_source"] for o in frame["objects"]]
    assert sources == ["x2sam", "SAM2", "SAM2"]
    replaced = frame["objects"][0]["replaced"]
    assert replaced["segmentation_source"] == "SAM2" and replaced["reason"] == "verification.score 0.2 < 0.5"
    assert decode_mask(frame["objects"][0]["segmentation"]).all()

    frame = _frame([0.2, 0.8, None])
    PreferMasks(PreferMasks.Params(min_x2sam_score=0.95, replace_unscored=True)).choose(frame)
    assert [o["segmentation_source"] for o in frame["objects"]] == ["SAM2", "SAM2", "SAM2"]  # x2sam too weak
    frame = _frame([0.2, 0.8, None])
    PreferMasks(PreferMasks.Params(replace_unscored=True)).choose(frame)
    assert [o["segmentation_source"] for o in frame["objects"]] == ["x2sam", "SAM2", "x2sam"]
