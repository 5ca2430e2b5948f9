"""Where a stage's model lands and how often its pictures are decoded, without a GPU: the resources a
stage gets inside its operator's actor (a group's or its own), the device and dtype they resolve to,
and one decode per picture shared by every stage of an actor."""

import pyarrow as pa
import pytest
import torch

import groundmill.stages.base as base
from groundmill.pipeline.config import load_config, segments
from groundmill.pipeline.graph import build_stage, operator_specs, run_stages
from groundmill.stages.base import ROW_SCHEMA
from groundmill.stages.models import device_for, dtype_for
from groundmill.tests.stage_samples import image_sample, video_sample

MANIFEST = """
inputs: [x]
groups:
  gpu_group: {num_cpus: 2, num_gpus: 0.5, batch_size: 8}
stages:
  tagging: {group: gpu_group, model: {dtype: bfloat16}, resources: {batch_size: 2, num_gpus: 0}}
  landmark: {group: gpu_group, resources: {batch_size: 3}}
  detection: {model: {dtype: float16}, resources: {num_gpus: 0.25, batch_size: 4}}
  captions: {resources: {num_gpus: 0}}
"""


@pytest.fixture
def built(tmp_path):
    (tmp_path / "m.yaml").write_text(MANIFEST)
    cfg = load_config(tmp_path / "m.yaml")
    return {
        name: build_stage(name, c, 0, cls) for seg in segments(cfg) for name, c, cls in operator_specs(seg)
    }


def test_grouped_stages_get_the_groups_devices_and_keep_their_batch_size(built):
    r = {name: stage.resources for name, stage in built.items()}
    assert (r["tagging"].num_gpus, r["tagging"].num_cpus, r["tagging"].batch_size) == (0.5, 2, 2)
    assert (r["landmark"].num_gpus, r["landmark"].batch_size) == (0.5, 3)
    assert (r["detection"].num_gpus, r["detection"].batch_size) == (0.25, 4)
    assert r["captions"].num_gpus == 0


@pytest.mark.parametrize("cuda", [True, False])
def test_models_land_on_the_actors_device_in_the_stages_dtype(built, cuda):
    device = {n: device_for(s.model_spec, s.resources, cuda_available=cuda) for n, s in built.items()}
    gpu = "cuda" if cuda else "cpu"
    assert {n: d.type for n, d in device.items()} == {
        "tagging": gpu, "landmark": gpu, "detection": gpu, "captions": "cpu"
    }  # fmt: skip
    dtypes = {n: dtype_for(s.model_spec, device[n]) for n, s in built.items()}
    half = {"tagging": torch.bfloat16, "detection": torch.float16} if cuda else {}
    assert dtypes == {n: half.get(n, torch.float32) for n in built}  # fp32 on CPU whatever was asked


def test_an_explicit_device_wins_over_resources(built):
    spec = built["captions"].model_spec
    spec.device = "cpu"
    assert device_for(spec, built["tagging"].resources, cuda_available=True).type == "cpu"


def test_a_groups_stages_decode_each_picture_once(monkeypatch):
    """Two model stages of one actor over two images and a two-keyframe video: one decode a picture."""
    calls = []
    decode = base.decode_rgb
    monkeypatch.setattr(base, "decode_rgb", lambda data: calls.append(1) or decode(data))
    stages = [(name, _tiny(name)) for name in ("tagging", "landmark")]
    samples = [image_sample(1), image_sample(2, (64, 80)), video_sample()]
    batch = pa.Table.from_pylist([s.to_row() for s in samples], schema=ROW_SCHEMA)
    out = run_stages(stages, batch).to_pylist()
    assert all(row["status"] == "ok" for row in out)
    assert len(calls) == 4  # 2 images + 2 keyframes, whichever stages read them


def _tiny(name: str):
    from groundmill.tests.stage_samples import build

    stage = build(name, {}, "tiny")
    stage.setup()
    return stage
