"""The GranD image stages through the real Ray pipeline: shards hold valid records whose masks lie in
their boxes, and the run record says which models were random."""

import json
import os

import pytest
import webdataset as wds
from PIL import Image

from groundmill.pipeline.config import load_config
from groundmill.pipeline.run import run_pipeline
from groundmill.schema import check_record, decode_mask, mask_bbox
from groundmill.shards import SHARDS_DIR, read_index
from groundmill.stages.boxes import mask_within_box
from groundmill.tests.stage_samples import png

pytestmark = pytest.mark.slow
# Ten model actors start on 2 shared cores: under load a worker can take more than Ray's default 60 s
# to import torch and register, and Ray then kills and restarts it for ever. Set before Ray starts
# (test modules are imported before the session's Ray fixture runs).
os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")

# Every actor holds its CPUs for the whole run: stages, voting and loading must fit 2 CPUs together.
STAGES = """
load: {num_cpus: 0.5}
stages:
  tagging: {model: {id: tiny}, resources: {num_cpus: 0.1, batch_size: 2}, params: {top_k: 3, min_score: 0.0}}
  landmark: {model: {id: tiny}, resources: {num_cpus: 0.1, batch_size: 2}}
  owl:
    type: detection
    model: {id: tiny}
    resources: {num_cpus: 0.1, batch_size: 2}
    params: {detector: owlv2, score_threshold: 0.05, max_boxes: 3}
  gdino:
    type: detection
    model: {id: tiny}
    resources: {num_cpus: 0.1, batch_size: 2}
    params: {detector: grounding_dino, score_threshold: 0.05, max_boxes: 3}
  masks: {group: after_detection, model: {id: tiny}, resources: {batch_size: 2}}
  # every box pairs up, and random SAM2 masks never agree, so no Dice check either: objects exist
  voting: {group: after_detection, resources: {batch_size: 2}, params: {min_iou: 0.0, min_dice: 0.0}}
  depth: {group: after_detection, model: {id: tiny}, resources: {batch_size: 2}}
  attributes: {group: after_detection, model: {id: tiny}, resources: {batch_size: 2}}
  captions:
    model: {id: tiny}
    resources: {num_cpus: 0.1, batch_size: 2}
    params: {num_captions: 2, generation: {max_new_tokens: 8}}
  grounding:
    model: {id: sentence-transformers/all-MiniLM-L6-v2}
    resources: {num_cpus: 0.1, batch_size: 2}
    params: {min_similarity: -1.0}
# One actor runs these four stages: batches of 3 images, which each stage takes 2 at a time.
groups:
  after_detection: {num_cpus: 0.1, batch_size: 3}
"""


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("grand")
    (tmp / "in").mkdir()
    for i, size in enumerate([(96, 72), (64, 80), (80, 80)]):
        (tmp / "in" / f"im{i}.png").write_bytes(png(i, size))
    run, records = _run(tmp, "out", STAGES)
    return tmp, run, records


def _run(tmp, out: str, stages: str) -> tuple[dict, list[dict]]:
    manifest = tmp / f"{out}.yaml"
    manifest.write_text(
        f"inputs: [{tmp / 'in'}]\noutput: {{dir: {tmp / out}, shard_max_samples: 8}}\n" + stages
    )
    run = run_pipeline(load_config(manifest))
    tars = sorted(str(p) for p in (tmp / out / SHARDS_DIR).glob("*.tar"))
    return run, [json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)]


def test_a_group_changes_speed_not_annotations(image_run):
    """The same stages, each in its own pool, write the same records as with four of them grouped."""
    tmp, _, grouped = image_run
    ungrouped = STAGES.replace("group: after_detection, ", "").replace(
        "{batch_size: 2}", "{num_cpus: 0.1, batch_size: 2}"
    )
    _, alone = _run(tmp, "ungrouped", ungrouped)
    assert sorted(alone, key=lambda r: r["key"]) == sorted(grouped, key=lambda r: r["key"])


def test_every_image_is_annotated_by_every_stage(image_run):
    tmp, run, records = image_run
    index = read_index(tmp / "out").to_pylist()
    assert len(index) == 3 and all(r["status"] == "ok" for r in index), [r["error"] for r in index]
    assert len(records) == 3
    for rec in records:
        assert set(rec["provenance"]) == {n for n in run["stages"]}
        for field in ("tags", "landmark", "detections", "objects", "floating_objects", "captions"):
            assert field in rec
        assert set(rec["detections"]) == {"owl", "gdino"}  # keyed by stage (the manifest key)
    assert sum(len(r["objects"]) for r in records) > 0  # min_iou 0, min_dice 0: both detectors pair up


def test_records_are_valid_and_masks_lie_in_their_boxes(image_run):
    _, _, records = image_run
    n = 0
    for rec in records:
        assert check_record(rec) == []
        for obj in rec["objects"] + rec["floating_objects"]:
            mask = decode_mask(obj["segmentation"])
            assert mask.shape == (rec["media"]["height"], rec["media"]["width"])
            assert mask_within_box(mask_bbox(obj["segmentation"]), obj["bbox"])
            assert "depth" in obj and obj["labels"]
            n += 1
    assert n > 0
    assert any(rec["relationships"]["grounding"] for rec in records)


def test_run_record_flags_random_models(image_run):
    _, run, _ = image_run
    assert set(run["random_weight_models"]) == {
        "tagging", "landmark", "owl", "gdino", "masks", "depth", "attributes", "captions",
    }  # fmt: skip
    assert run["stages"]["grounding"]["random_weights"] is False
    assert run["stages"]["owl"]["detector"] == "owlv2"


def test_images_stored_unchanged_in_size(image_run):
    tmp, _, records = image_run
    sizes = sorted((r["media"]["width"], r["media"]["height"]) for r in records)
    assert sizes == sorted(Image.open(p).size for p in (tmp / "in").glob("*.png"))
