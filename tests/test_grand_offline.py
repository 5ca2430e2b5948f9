"""manifests/grand.yaml, the production stage set, run unchanged offline: `groundmill fixture hub DIR`
writes every hub id as a tiny random-weight model in the real repo layout, then
`HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR groundmill run manifests/grand.yaml --cpu` loads each one by its
hub id. The run record says which models were random and what `--cpu` substituted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import webdataset as wds

from groundmill.pipeline.cli import GRAND_MANIFEST
from groundmill.pipeline.config import ConfigError, apply_cpu, load_config, segments
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.pipeline.fixture import manifest_models, write_snapshot
from groundmill.pipeline.graph import check_resources
from groundmill.schema import decode_mask, mask_bbox
from groundmill.shards import SHARDS_DIR, read_index
from groundmill.stages import stage_class
from groundmill.stages.base import ModelSpec
from groundmill.stages.detection import COCO_PANOPTIC_LABELS, panoptic_label
from groundmill.stages.hub import FIXTURE_MARKER, random_weights, repo_id
from groundmill.stages.llm.stage import LLMStage
from groundmill.stages.tagging import load_vocabulary
from groundmill.tests.stage_samples import build, image_sample, png

# Random weights need open thresholds to produce anything for the later stages to work on (tags,
# boxes, agreeing boxes, hence objects, tracks and LLM prompts), and CPU-sized token budgets; the
# manifest itself runs as written.
OVERRIDES = [
    "video.keyframes=2",
    "stages.tagging.params.min_score=0.0",
    *(f"stages.{d}.params.{k}" for d in ("detect_owlv2", "detect_grounding_dino", "detect_mask2former")
      for k in ("score_threshold=0.0", "max_boxes=3")),
    "stages.voting.params.min_iou=0.0",
    "stages.voting.params.min_dice=0.0",
    "stages.auto_masks.params.points_per_side=4",  # CPU-sized point grid, open quality filters
    "stages.auto_masks.params.pred_iou_thresh=0.0",
    "stages.auto_masks.params.stability_score_thresh=0.0",
    "stages.stuff.params.short_side=64",  # one window per side of the tiny CLIP
    "stages.stuff.params.min_score=0.0",
    "stages.captions.params.num_captions=2",
    "stages.captions.params.generation.max_new_tokens=8",
    *(f"stages.{s}.params.{k}" for s in ("dense_caption", "extra_context", "video_expressions")
      for k in ("max_new_tokens=12", "attempts=1")),
]  # fmt: skip
FIXTURE_REPOS = {
    "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K": "open_clip",
    "google/owlv2-large-patch14-ensemble": "owlv2",
    "IDEA-Research/grounding-dino-base": "grounding_dino",
    "facebook/mask2former-swin-large-coco-panoptic": "mask2former",
    "facebook/sam2.1-hiera-large": "sam2",
    "timm/vit_base_patch16_clip_224.openai": "open_clip",
    "facebook/dino-vitb8": "dino",
    "depth-anything/Depth-Anything-V2-Large-hf": "depth",
    "Salesforce/blip2-opt-2.7b": "image_to_text",
    "sentence-transformers/all-MiniLM-L6-v2": "sentence_embedder",
    "Qwen/Qwen2.5-14B-Instruct": "causal_lm",
}
# Record-level fields of videos; every other provided field is written on each image / keyframe.
VIDEO_FIELDS = {"tracks", "frame_times", "expressions", "video_captions"}
# The voting stage moves each detection's mask to the object it becomes.
MOVED = {"detections.segmentation": ("objects.segmentation", "floating_objects.segmentation")}


def _groundmill(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    cmd = [sys.executable, "-m", "groundmill.pipeline.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def grand_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grand")
    cache, inputs, out = tmp / "hub", tmp / "in", tmp / "out"
    inputs.mkdir()
    for i, size in enumerate([(96, 72), (80, 64)]):
        (inputs / f"im{i}.png").write_bytes(png(i, size))
    write_shapes_video(inputs / "clip.mp4", num_frames=6, size=(64, 48))
    _groundmill("fixture", "hub", str(cache), cache=cache)
    _groundmill(
        "run",
        str(GRAND_MANIFEST),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--cpu",
        *OVERRIDES,
        cache=cache,
    )
    run = json.loads((out / "run.json").read_text())
    tars = sorted(str(p) for p in (out / SHARDS_DIR).glob("*.tar"))
    records = [json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)]
    return cache, out, run, records


def _frames(record: dict) -> list[dict]:
    return record["keyframes"] if record["media"]["type"] == "video" else [record]


def _has(data: dict, dotted: str) -> bool:
    """`a`: a key of data. `a.b`: b is a key of data[a] when that is a dict, else every element of
    data[a] (a list, or a dict of lists such as detections per model) has b."""
    head, _, rest = dotted.partition(".")
    if head not in data:
        return False
    value = data[head]
    if not rest:
        return True
    if isinstance(value, dict):
        if rest in value:
            return True
        value = [x for v in value.values() if isinstance(v, list) for x in v]
    return all(rest in x for x in value)


@pytest.mark.slow
def test_every_hub_id_resolves_offline_in_the_real_layout(grand_run):
    cache = grand_run[0]
    assert manifest_models(load_config(GRAND_MANIFEST)) == FIXTURE_REPOS
    for repo in FIXTURE_REPOS:
        snapshot = Path(huggingface_hub.snapshot_download(repo, local_files_only=True, cache_dir=cache))
        commit = (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").read_text()
        assert snapshot.name == commit
        assert (snapshot / FIXTURE_MARKER).is_file() == (repo != "sentence-transformers/all-MiniLM-L6-v2")
    sam2 = huggingface_hub.hf_hub_download(
        "facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt", local_files_only=True, cache_dir=cache
    )
    assert Path(sam2).stat().st_size > 0


@pytest.mark.slow
def test_every_stage_wrote_its_fields(grand_run):
    _, out, run, records = grand_run
    index = read_index(out).to_pylist()
    assert len(index) == 3 and all(r["status"] == "ok" for r in index), [r["error"] for r in index]
    assert sorted(r["media"]["type"] for r in records) == ["image", "image", "video"]
    for record in records:
        is_video = record["media"]["type"] == "video"
        assert set(record["provenance"]) == set(run["stages"])
        for name, info in run["stages"].items():
            cls = stage_class(info["type"])
            for field in cls.provides:
                if field in VIDEO_FIELDS:
                    assert not is_video or _has(record, field), (name, field)
                    continue
                if field == "gcg" and is_video:  # GranD-f's GCG is per image
                    continue
                for frame in _frames(record):
                    dropped = any(d["stage"] == name for d in frame.get("llm_drops", []))
                    needs = [f for f in cls.requires if f not in ("scene_graph", "objects", "detections")]
                    if issubclass(cls, LLMStage) and (dropped or not all(_has(frame, f) for f in needs)):
                        continue  # an LLM output is there, or dropped with its reason (GranD drops):
                        # random weights never end a sentence within the token budget
                    assert all(_has(frame, f) for f in MOVED.get(field, (field,))), (name, field)
    frames = [f for r in records for f in _frames(r)]
    assert all(f["tags"] and f["landmark"] and f["captions"] for f in frames)
    assert all(len(f["detections"]) == 3 for f in frames)  # three detector stages
    assert all(f["objects"] for f in frames)  # min_iou 0, min_dice 0: the detectors agree
    # keyed by detector family here, by stage name once detections are keyed by stage
    assert any(dets for f in frames for key, dets in f["detections"].items() if "mask2former" in key)
    (video,) = [r for r in records if r["media"]["type"] == "video"]
    assert video["tracks"]  # the hub-loaded SAM 2.1 video predictor tracked the keyframe objects


@pytest.mark.slow
def test_run_record_says_which_models_were_random(grand_run):
    _, _, run, records = grand_run
    # all-MiniLM-L6-v2 (grounding, and verification's embedder): the real weights, from the registry
    real = {"grounding", "verification"}
    with_models = {n for n, s in run["stages"].items() if "random_weights" in s}
    assert set(run["random_weight_models"]) == with_models - real
    assert len(with_models) == 19  # mask_verification (its CLIP) and exhaustivity (its OWLv2) included
    for record in records:
        for name in with_models:
            assert record["provenance"][name]["random_weights"] is (name not in real)


@pytest.mark.slow
def test_run_record_lists_what_cpu_substituted(grand_run):
    _, _, run, _ = grand_run
    manifest = load_config(GRAND_MANIFEST)
    subs = {s["key"]: (s["from"], s["to"]) for s in run["substitutions"]}
    for name, stage in manifest.stages.items():
        if stage.resources.num_gpus:
            assert subs[f"stages.{name}.resources.num_gpus"] == (stage.resources.num_gpus, 0.0)
        if stage.model.dtype != "float32":
            assert subs[f"stages.{name}.model.dtype"] == (stage.model.dtype, "float32")
        llm = getattr(stage.params, "llm", None)
        if llm is not None and llm.backend == "vllm":
            assert subs[f"stages.{name}.params.llm.backend"] == ("vllm", "transformers")
            assert run["stages"][name]["backend"] == "transformers"
            assert run["stages"][name]["model"] == stage.model.id  # the same model id
    assert {k for k in subs if k.endswith(".params.llm.backend")} == {
        "stages.dense_caption.params.llm.backend",
        "stages.extra_context.params.llm.backend",
        "stages.video_expressions.params.llm.backend",
    }
    assert all(s["resources"]["num_gpus"] == 0 for s in run["config"]["stages"].values())


def test_cpu_fits_the_gpu_manifest_on_two_cores():
    cfg = load_config(GRAND_MANIFEST)
    check_resources(cfg, {"CPU": 96.0, "GPU": 8.0})  # sized for one 8-GPU node
    with pytest.raises(ConfigError, match="actor pools need"):
        check_resources(cfg, {"CPU": 2.0})
    apply_cpu(cfg, local_cpus=2)
    check_resources(cfg, {"CPU": 2.0})
    (pool,) = segments(cfg)  # one actor pool holds every stage
    assert pool.resources.num_gpus == 0 and pool.resources.max_actors == 1


def test_the_tag_vocabulary_is_grand_scale():
    words = load_vocabulary(["grand_tags"])
    assert len(words) >= 2000 and len(set(words)) == len(words)
    assert not any(w.startswith("#") for w in words)
    assert {"aerosol can", "sneakers", "tortoise", "person"} <= set(words)  # LVIS, Objects365, OpenImages


def test_the_fixture_marker_decides_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def config_only(repo: str, folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    write_snapshot(tmp_path, "org/fake", config_only, {"random_weights": True})
    write_snapshot(tmp_path, "org/real", config_only, None)
    assert random_weights(ModelSpec(id="org/fake")) and random_weights(ModelSpec(id="hf-hub:org/fake"))
    assert not random_weights(ModelSpec(id="org/real"))
    assert random_weights(ModelSpec(id="tiny")) and not random_weights(ModelSpec(id="smollm2"))
    with pytest.raises(FileExistsError):  # a real download in the cache is never overwritten
        write_snapshot(tmp_path, "org/real", config_only, {"random_weights": True})
    again = write_snapshot(tmp_path, "org/real", config_only, None)  # nor replaced by a copy
    assert again == next((tmp_path / "models--org--real" / "snapshots").iterdir())
    assert repo_id("ViT-B-32@laion2b_s34b_b79k") is None and repo_id(str(tmp_path)) is None


def test_mask2former_detections_carry_their_own_masks():
    stage = build("detection", {"detector": "mask2former", "score_threshold": 0.0, "max_boxes": 4}, "tiny")
    stage.setup()
    sample = image_sample(3, size=(90, 60))
    stage.process([sample])
    (dets,) = sample.record["detections"].values()
    assert dets and all(d["segmentation_source"] == "tiny" for d in dets)
    for d in dets:
        assert decode_mask(d["segmentation"]).shape == (60, 90)
        assert mask_bbox(d["segmentation"]) == d["bbox"]  # the box is the mask's tight box
        assert d["label"] in {panoptic_label(n) for n in COCO_PANOPTIC_LABELS} and "-" not in d["label"]
    assert panoptic_label("wall-other-merged") == "wall" and panoptic_label("playingfield") == "playingfield"


@pytest.mark.slow
def test_plan_from_the_offline_grand_output(grand_run, capsys):
    """The planner reads the offline run's timings for grand.yaml's GPU placement, and says the costs
    were measured without a GPU."""
    from groundmill.pipeline.cli import main

    out = grand_run[1]
    argv = ["plan", str(GRAND_MANIFEST), "--images", "11000000", "--gpus", "8", "--from", str(out), "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["gpu_hours"] > 0 and plan["wall_hours"] > 0 and plan["usd"] > 0
    assert plan["bottleneck"] in plan["stages"] and plan["bound_by"] in ("gpu", "cpu")
    assert any("without a GPU" in w for w in plan["warnings"])
