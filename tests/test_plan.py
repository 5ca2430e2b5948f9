"""The cost planner on hand-computed cases: costs read from an output's index timings (images per
sample, videos per second of video), the SCALING.md model, and the CLI's one JSON line."""

import json

import pytest

from groundmill.pipeline.cli import main
from groundmill.pipeline.config import load_config
from groundmill.pipeline.plan import make_plan, measured_costs
from groundmill.schema import content_key
from groundmill.shards import ShardWriter

MANIFEST = """
inputs: [x]
load: {num_cpus: 1}
groups:
  vision: {num_cpus: 2, num_gpus: 0.5}
stages:
  tagging: {group: vision}
  owl: {type: detection, group: vision}
  masks: {resources: {num_gpus: 1, num_cpus: 1}}
  voting: {resources: {num_cpus: 1}}
"""
TIMES = {"load": 0.1, "tagging": 0.2, "owl": 0.6, "masks": 1.0, "voting": 0.05}


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    return path


@pytest.fixture
def output(tmp_path):
    """An output of two images and one 10-second video with known per-stage timings."""
    out = tmp_path / "out"
    writers = {
        kind: ShardWriter(out, f"part-{kind}") for kind in ("image", "video")
    }  # one media kind a shard
    for i, (media, scale) in enumerate([("image", 1.0), ("image", 3.0), ("video", 20.0)]):
        key = content_key(bytes([i]))
        media_record = {"type": media, "ext": "mp4" if media == "video" else "jpg", "width": 8, "height": 8}
        if media == "video":
            media_record["duration_s"] = 10.0
        timings = {s: t * scale for s, t in TIMES.items()}
        row = {"uri": f"u{i}", "status": "ok", "media_type": media, "timings": timings}
        writers[media].add_sample(key, b"x", media_record["ext"], {"key": key, "media": media_record}, row)
    for writer in writers.values():
        writer.commit()
    (out / "run.json").write_text(json.dumps({"attempts": [{"cluster": {"CPU": 2.0, "GPU": 0.0}}]}))
    return out


def test_costs_are_means_per_image_and_per_video_second(output):
    costs = measured_costs(output)
    assert costs["masks"] == pytest.approx((2.0, 2.0))  # images: (1 + 3) / 2; video: 20 s over 10 s
    assert costs["owl"] == pytest.approx((1.2, 1.2)) and set(costs) == set(TIMES)


def test_plan_follows_the_scaling_model(manifest, output):
    cfg = load_config(manifest)
    plan = make_plan(cfg, measured_costs(output), 1000, 0.5, gpus=2, cpus_per_gpu=4, gpu_hour_usd=3.0,
                     efficiency=1.0, source=str(output))  # fmt: skip
    # work per stage: 1000 images * s/image + 1800 video-s * s/video-s = 2800 * mean cost
    gpu_s = 2800 * (0.4 * 0.5 + 1.2 * 0.5 + 2.0 * 1.0)  # tagging, owl (group: 0.5 GPU), masks (1 GPU)
    cpu_s = 2800 * (0.2 * 1 + 0.4 * 2 + 1.2 * 2 + 2.0 * 1 + 0.1 * 1)
    assert plan.gpu_hours == pytest.approx(gpu_s / 3600) and plan.cpu_hours == pytest.approx(cpu_s / 3600)
    wall = max(gpu_s / 2, cpu_s / 8) / 3600
    assert plan.wall_hours == pytest.approx(wall) and plan.usd == pytest.approx(2 * wall * 3.0)
    assert (plan.bound_by, plan.bottleneck) == ("gpu", "masks")
    assert plan.warnings and "without a GPU" in plan.warnings[0]  # CPU timings used for GPU stages
    slower = make_plan(cfg, measured_costs(output), 1000, 0.5, 2, 4, 3.0, 0.5, str(output))
    assert slower.wall_hours == pytest.approx(2 * wall) and slower.gpu_hours == pytest.approx(plan.gpu_hours)


def test_plan_needs_timings_of_every_stage(manifest, output, tmp_path):
    cfg = load_config(manifest, ["stages.depth={resources: {num_gpus: 1}}"])
    with pytest.raises(ValueError, match="no timings for stage.*depth"):
        make_plan(cfg, measured_costs(output), 10, 0, 1, 8, 1.0, 1.0, str(output))


def test_cli_prints_one_json_line(manifest, output, capsys):
    argv = [
        "plan",
        str(manifest),
        "--images",
        "1000",
        "--video-hours",
        "0.5",
        "--gpus",
        "2",
        "--from",
        str(output),
    ]
    assert main([*argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(lines[-1])
    assert len(lines) == 1 and {"gpu_hours", "wall_hours", "usd", "bottleneck"} <= set(plan)
    assert plan["bottleneck"] == "masks"
    assert main(argv) == 0 and "bottleneck: masks" in capsys.readouterr().out
