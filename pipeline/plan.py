"""`groundmill plan`: GPU-hours, wall-clock and dollars of a manifest on a corpus, before running it.

    groundmill plan MANIFEST --images N [--video-hours H] [--gpus G] [--gpu-hour-usd P] [--from OUT_DIR] [--json]

The inputs are per-stage costs: the mean seconds each stage spent per image, and per second of video,
read from an earlier run's index timings (`--from`), or from a short calibration run of MANIFEST on
the bundled sample. The model is benchmarks/SCALING.md's: a stage holds its actor's `num_gpus` and
`num_cpus` while it works on a sample, so

    gpu_seconds = sum over stages of t_s * gpus_s        cpu_seconds = sum of t_s * cpus_s
    wall        = max(gpu_seconds_total / G, cpu_seconds_total / C) / efficiency
    usd         = G * wall * price                       (the node is rented for the whole run)

with C = G * cpus_per_gpu. The bottleneck is the stage holding the scarcest resource longest. Costs
measured on CPU and used for GPU stages overstate their GPU time; the plan says so (`warnings`).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from groundmill.pipeline.config import Config, load_config, segments
from groundmill.shards import iter_shard, read_index

LOAD_STAGE = "load"


@dataclass
class StageCost:
    """One stage of the plan: seconds per image and per video second, and what its actor holds."""

    image_s: float
    video_s_per_s: float
    gpus: float
    cpus: float


@dataclass
class Plan:
    images: int
    video_hours: float
    gpus: int
    cpus: int
    gpu_hour_usd: float
    gpu_hours: float
    cpu_hours: float
    wall_hours: float
    usd: float
    bottleneck: str
    bound_by: str  # "gpu" | "cpu"
    stages: dict[str, dict[str, float]]
    source: str
    warnings: list[str] = field(default_factory=list)


def timing_pairs(timings: Any) -> list[tuple[str, float]]:
    """An index row's timings as (stage, seconds): a map column, or a list of {stage, seconds}."""
    if not timings:
        return []
    return [(t["stage"], t["seconds"]) if isinstance(t, dict) else (t[0], t[1]) for t in timings]


def video_durations(out: Path, keys: set[str]) -> dict[str, float]:
    """Seconds of each video sample (from its record), reading only shards that hold videos."""
    rows = read_index(out, columns=["key", "shard"]).to_pylist()
    shards = sorted({r["shard"] for r in rows if r["key"] in keys and r["shard"]})
    durations = {}
    for shard in shards:
        for key, files in iter_shard(out / shard):
            if key in keys:
                durations[key] = float(json.loads(files["json"])["media"].get("duration_s") or 0.0)
    return durations


def measured_costs(out: Path) -> dict[str, tuple[float, float]]:
    """stage -> (seconds per image, seconds per second of video) from an output's index timings."""
    rows = read_index(out, columns=["key", "media_type", "status", "timings"]).to_pylist()
    rows = [r for r in rows if r["status"] == "ok" and r["media_type"]]
    videos = {r["key"] for r in rows if r["media_type"] == "video"}
    durations = video_durations(out, videos) if videos else {}
    image_s: dict[str, list[float]] = defaultdict(list)
    video_s: dict[str, float] = defaultdict(float)
    for r in rows:
        for stage, seconds in timing_pairs(r["timings"]):
            if r["media_type"] == "image":
                image_s[stage].append(seconds)
            else:
                video_s[stage] += seconds
    total_video = sum(durations.values())
    stages = set(image_s) | set(video_s)
    return {
        s: (
            sum(image_s[s]) / len(image_s[s]) if image_s[s] else 0.0,
            video_s[s] / total_video if total_video else 0.0,
        )
        for s in stages
    }


def stage_costs(cfg: Config, measured: dict[str, tuple[float, float]]) -> dict[str, StageCost]:
    """The target manifest's stages (and loading) with their measured costs and actor resources."""
    image_s, video_s = measured.get(LOAD_STAGE, (0.0, 0.0))
    costs = {LOAD_STAGE: StageCost(image_s, video_s, 0.0, cfg.load.num_cpus)}
    missing = []
    for seg in segments(cfg):
        for name in seg.stages:
            if name not in measured:
                missing.append(name)
                continue
            r = seg.stage_resources(name)
            costs[name] = StageCost(*measured[name], gpus=r.num_gpus, cpus=r.num_cpus)
    if missing:
        raise ValueError(
            f"no timings for stage(s) {', '.join(missing)} in the calibration output: plan from a run "
            "of the same stages (--from), or leave --from out to calibrate on the bundled sample"
        )
    return costs


def make_plan(
    cfg: Config, measured: dict[str, tuple[float, float]], images: int, video_hours: float, gpus: int,
    cpus_per_gpu: int, gpu_hour_usd: float, efficiency: float, source: str,
) -> Plan:  # fmt: skip
    costs = stage_costs(cfg, measured)
    video_s = video_hours * 3600
    work = {name: images * c.image_s + video_s * c.video_s_per_s for name, c in costs.items()}  # s per stage
    gpu_s = {n: work[n] * c.gpus for n, c in costs.items()}
    cpu_s = {n: work[n] * c.cpus for n, c in costs.items()}
    cpus = gpus * cpus_per_gpu
    gpu_wall, cpu_wall = sum(gpu_s.values()) / max(gpus, 1), sum(cpu_s.values()) / max(cpus, 1)
    bound = "gpu" if gpu_wall >= cpu_wall and sum(gpu_s.values()) > 0 else "cpu"
    held = gpu_s if bound == "gpu" else cpu_s
    wall_hours = max(gpu_wall, cpu_wall) / efficiency / 3600
    warnings = []
    if any(c.gpus > 0 for c in costs.values()) and not _measured_on_gpu(source):
        warnings.append(
            "per-stage costs were measured without a GPU: GPU stages' times are CPU times, so GPU-hours "
            "and wall-clock are upper bounds; plan --from a run on the target GPUs for a forecast"
        )
    return Plan(
        images=images, video_hours=video_hours, gpus=gpus, cpus=cpus, gpu_hour_usd=gpu_hour_usd,
        gpu_hours=sum(gpu_s.values()) / 3600, cpu_hours=sum(cpu_s.values()) / 3600,
        wall_hours=wall_hours, usd=gpus * wall_hours * gpu_hour_usd, bottleneck=max(held, key=held.get),
        bound_by=bound, source=source, warnings=warnings,
        stages={n: {**asdict(c), "gpu_hours": gpu_s[n] / 3600, "cpu_hours": cpu_s[n] / 3600} for n, c in costs.items()},
    )  # fmt: skip


def _measured_on_gpu(source: str) -> bool:
    """Whether the calibration output was made on a Ray cluster with GPUs (its run record says)."""
    record = Path(source) / "run.json"
    if not record.exists():
        return False
    attempts = json.loads(record.read_text()).get("attempts", [])
    return any(a.get("cluster", {}).get("GPU", 0) > 0 for a in attempts)


def calibrate(manifest: str, overrides: list[str]) -> Path:
    """Run MANIFEST on the bundled sample (a few photos and a video) into a temp dir; its output."""
    from groundmill.pipeline.demo_data import write_demo_inputs
    from groundmill.pipeline.run import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="groundmill-plan-"))
    write_demo_inputs(work / "inputs")
    cfg = load_config(manifest, [*overrides, f"inputs=[{work / 'inputs'}]", f"output.dir={work / 'out'}"])
    run_pipeline(cfg)
    return work / "out"


def format_plan(p: Plan) -> str:
    lines = [
        f"{p.images:,} images + {p.video_hours:g} video-hours on {p.gpus} GPUs ({p.cpus} CPU cores), "
        f"costs from {p.source}",
        f"  GPU-hours   {p.gpu_hours:,.2f}",
        f"  CPU-hours   {p.cpu_hours:,.2f}",
        f"  wall-clock  {p.wall_hours:,.2f} h ({p.bound_by}-bound; bottleneck: {p.bottleneck})",
        f"  cost        ${p.usd:,.2f} at ${p.gpu_hour_usd:g} per GPU-hour",
        "  stage                     s/image   s/video-s   gpus   GPU-hours",
    ]
    width = max(len(n) for n in p.stages)
    for name, s in sorted(p.stages.items(), key=lambda kv: -kv[1]["gpu_hours"]):
        lines.append(
            f"    {name:<{width}}  {s['image_s']:9.4f} {s['video_s_per_s']:11.4f} {s['gpus']:6.2f} {s['gpu_hours']:11.2f}"
        )
    return "\n".join(lines + [f"  warning: {w}" for w in p.warnings])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groundmill plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--images", type=int, required=True, help="images in the corpus")
    parser.add_argument("--video-hours", type=float, default=0.0, help="hours of video in the corpus")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the run gets")
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per GPU")
    parser.add_argument("--gpu-hour-usd", type=float, default=2.5, help="price of one GPU-hour")
    parser.add_argument(
        "--efficiency", type=float, default=1.0, help="pipeline / ideal (make bench); 1 = ideal"
    )
    parser.add_argument("--from", dest="source", help="an output dir whose index timings give the costs")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides of MANIFEST")
    args = parser.parse_args(argv)
    if args.images < 0 or args.video_hours < 0 or args.gpus < 1 or not 0 < args.efficiency <= 1:
        parser.error("--images and --video-hours must be >= 0, --gpus >= 1, 0 < --efficiency <= 1")
    cfg = load_config(args.manifest, ["inputs=[.]", *args.overrides])
    source = Path(args.source) if args.source else calibrate(args.manifest, args.overrides)
    plan = make_plan(
        cfg, measured_costs(source), args.images, args.video_hours, args.gpus, args.cpus_per_gpu,
        args.gpu_hour_usd, args.efficiency, str(source),
    )  # fmt: skip
    print(json.dumps(asdict(plan)) if args.json else format_plan(plan))
    return 0 if math.isfinite(plan.wall_hours) else 1
