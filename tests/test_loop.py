"""`make loop`'s scoring and hand-over on a hand-built engine output: the annotation mIoU against the
ground truth (a name's objects unioned, a missing mask counting 0), and the engine's masks turned into
training records the trainer's referring task reads."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from groundmill.model.config import SourceConfig
from groundmill.model.records import eval_records
from groundmill.model.tasks import referring_targets
from groundmill.pipeline.loop import annotation_miou, write_pseudo_labels
from groundmill.schema import content_key, encode_mask, new_record
from groundmill.shards import ShardWriter


def _mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((16, 16), bool)
    m[y0:y1, x0:x1] = True
    return m


def _engine_output(out, entries: list[dict]) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    key = content_key(buf.getvalue())
    record = new_record(key, {"uri": "a.png", "sha256": key, "bytes": 1, "format": "png"},
                        {"type": "image", "ext": "png", "width": 16, "height": 16}, [])  # fmt: skip
    record["x2sam"] = entries
    writer = ShardWriter(out, name="engine-00000")
    writer.add_sample(
        key, buf.getvalue(), "png", record, {"uri": "a.png", "status": "ok", "media_type": "image"}
    )
    writer.commit()
    return key


def _entry(text: str, mask: np.ndarray) -> dict:
    return {"kind": "phrases", "text": text, "object_ids": [], "segmentation": encode_mask(mask),
            "segmentation_source": "x2sam", "score": 0.9}  # fmt: skip


def test_annotation_miou_unions_a_names_objects_and_counts_missing_masks_as_zero(tmp_path):
    pred = _mask(0, 4, 0, 8)  # covers the two red circles (4x4 each) exactly
    key = _engine_output(tmp_path, [_entry("red circle", pred), _entry("blue square", _mask(8, 12, 8, 10))])
    truth = {key: [
        {"labels": ["red circle"], "segmentation": encode_mask(_mask(0, 4, 0, 4))},
        {"labels": ["red circle"], "segmentation": encode_mask(_mask(0, 4, 4, 8))},
        {"labels": ["blue square"], "segmentation": encode_mask(_mask(8, 12, 8, 12))},
        {"labels": ["green triangle"], "segmentation": encode_mask(_mask(12, 16, 0, 4))},
    ]}  # fmt: skip
    # red circle: 1.0; blue square: 8 / 16; green triangle: no mask, 0
    assert annotation_miou(tmp_path, truth) == (1.0 + 0.5 + 0.0) / 3


def test_pseudo_labels_are_referring_targets_for_the_trainer(tmp_path):
    masks = {"red circle": _mask(0, 4, 0, 8), "blue square": _mask(8, 12, 8, 12)}
    _engine_output(tmp_path / "engine", [_entry(t, m) for t, m in masks.items()])
    assert write_pseudo_labels(tmp_path / "engine", tmp_path / "pseudo") == 1
    [(record, _)] = list(eval_records([SourceConfig(path=str(tmp_path / "pseudo"))], 16))
    targets = dict(referring_targets(record, 16))
    assert targets.keys() == masks.keys()
    assert all(np.array_equal(targets[t], masks[t]) for t in masks)
