"""The figures of `make bench` (benchmarks/): the bound, the memory slopes, the GPU figures, the
steady-state throughput from commit times, the GranD baseline's passes and the long-lived pools'
sizes. Logic tests on synthetic inputs with known answers, and tiny real writes (no Ray, no models)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from groundmill.benchmarks.bound import ideal, threads_for
from groundmill.benchmarks.cluster import gpu_figures, gpu_stage_figures
from groundmill.benchmarks.grand_baseline import passes
from groundmill.benchmarks.measure import commit_throughput
from groundmill.benchmarks.run import during_run, memory_figures, slope_per_1k
from groundmill.pipeline.config import load_config
from groundmill.pipeline.graph import pool_sizes
from groundmill.schema import content_key
from groundmill.shards import ShardWriter


def _op(wall: float, cpu: float, workers: float, gpu: float = 0.0) -> dict[str, float]:
    return {"wall_s": wall, "cpu_s": cpu, "gpu_s": gpu, "workers": workers}


def test_ideal_is_the_tightest_of_operator_cpu_and_gpu_limits():
    ops = {"load": _op(0.01, 0.01, 2), "model": _op(0.5, 0.5, 2), "sink": _op(0.01, 0.01, 2)}
    r = ideal(ops, cores=2, gpus=0)
    assert r["limits"]["operator model"] == pytest.approx(4.0)  # 2 workers / 0.5 s
    assert r["limits"]["cpu"] == pytest.approx(2 / 0.52)  # the CPU is shared by all operators
    assert r["bound_by"] == "cpu" and r["ideal_samples_per_s"] == pytest.approx(2 / 0.52)
    # One worker of the model operator binds before the cores do.
    r = ideal(ops | {"model": _op(0.5, 0.5, 1)}, cores=2, gpus=0)
    assert r["bound_by"] == "operator model" and r["ideal_samples_per_s"] == pytest.approx(2.0)
    # On a GPU, GPU-seconds count only when the cluster has GPUs.
    ops_gpu = ops | {"model": _op(0.1, 0.02, 4, gpu=0.4)}
    assert ideal(ops_gpu, cores=2, gpus=1)["bound_by"] == "gpu"
    assert ideal(ops_gpu, cores=2, gpus=1)["ideal_samples_per_s"] == pytest.approx(2.5)
    assert "gpu" not in ideal(ops_gpu, cores=2, gpus=0)["limits"]


def test_ray_thread_count_of_a_worker():
    assert [threads_for(c) for c in (0.25, 0.5, 1, 1.5, 2, 4)] == [1, 1, 1, 1, 2, 4]


def _series(mb_per_1k: float, inputs: int, base_mb: float = 300) -> list[tuple[float, ...]]:
    """(t, driver RSS, RSS sum, PSS, rows) samples of a driver growing by `mb_per_1k` per 1k inputs,
    a PSS bump while warming up, and Ray's shutdown after the last commit."""
    run = [(t, (base_mb + mb_per_1k * rows / 1000) * 1e6, 5e9, (2000 + (50 if t < 2 else 0)) * 1e6, rows)
           for t, rows in enumerate(range(0, inputs + 1, 20))]  # fmt: skip
    return [*run, (len(run), base_mb * 1e6, 1e8, 1e8, inputs)]


def test_memory_slope_follows_the_driver_and_leaves_out_warm_up_and_shutdown():
    assert slope_per_1k(during_run(_series(25.0, 600), 60, 600), 1) == pytest.approx(25.0)
    assert slope_per_1k(during_run(_series(0.0, 600), 60, 600), 1) == pytest.approx(0.0)
    assert slope_per_1k(during_run(_series(0.0, 600), 60, 600), 3) == pytest.approx(0.0)  # no bump, no drop
    assert math.isnan(slope_per_1k(during_run(_series(0.0, 10), 60, 10), 1))  # too few points
    fig = memory_figures({"memory_series": _series(4.0, 600), "seconds": 9.0, "ok": 600}, 600)
    assert fig["driver_rss_mb_per_1k_inputs"] == pytest.approx(4.0)
    assert fig["peak_driver_rss_mb"] == pytest.approx(300 + 4.0 * 0.6)
    assert fig["pss_range_after_warm_up_mb"] == pytest.approx(0.0) and fig["peak_pss_mb"] == pytest.approx(
        2050
    )


def test_gpu_figures_per_stage_and_no_gpu_said_honestly(tmp_path):
    rows = [{"media_type": "image", "timings": [("tagging", 0.2), ("masks", 0.6)]},
            {"media_type": "image", "timings": [{"stage": "tagging", "seconds": 0.4}, {"stage": "masks", "seconds": 1.0}]},
            {"media_type": "video", "timings": [("tagging", 9.0)]}]  # fmt: skip
    figures = gpu_stage_figures(
        rows, {"tagging": 0.25, "masks": 0.5}, seconds=2.0, actors={"tagging": 1, "masks": 2}
    )
    assert figures["tagging"]["s_per_image"] == pytest.approx(0.3)  # videos are not images
    assert figures["tagging"]["gpu_s_per_image"] == pytest.approx(0.075)
    assert figures["tagging"]["busy_share"] == pytest.approx(0.6 / 2.0)
    assert figures["masks"]["busy_share"] == pytest.approx(1.6 / (2.0 * 2))
    assert gpu_figures("manifests/bench.yaml", tmp_path, tmp_path, gpus=0) == {"skipped": "no GPU"}


def test_steady_throughput_is_the_slope_of_commits_after_the_first(tmp_path):
    # The first part lands late with a burst (fill); then 4 rows every 2 s.
    for n, commit_time in enumerate((100.0, 100.5, 102.5, 104.5, 106.5)):
        writer = ShardWriter(tmp_path, name=f"part{n}")
        for i in range(8 if n == 0 else 4):
            key = content_key(bytes([n, i]))
            writer.add_sample(key, b"jpeg", "jpg", {"key": key}, {"uri": f"{n}-{i}", "status": "ok"})
        writer.commit()
        os.utime(tmp_path / "index" / f"part{n}.parquet", (commit_time, commit_time))
    assert commit_throughput(tmp_path) == pytest.approx(2.0)


def test_grand_baseline_passes_match_the_pipelines_workers_and_threads():
    cfg = load_config("manifests/bench.yaml", ["inputs=[.]"])
    got = passes(cfg)
    stages = [n for n, s in cfg.stages.items() if s.enabled]
    assert [p[0] for p in got] == ["load", *stages, "write"]
    assert {(p[1], p[2]) for p in got} == {(cfg.groups["grand"].max_actors, 1)}  # 2 processes, 1 thread


def test_long_lived_pools_take_max_actors_only_when_all_fit():
    cfg = load_config("manifests/grand.yaml", ["inputs=[.]"])
    roomy = pool_sizes(cfg, {"CPU": 1000, "GPU": 100})
    tight = pool_sizes(cfg, {"CPU": 1000, "GPU": 8})
    assert roomy["tagging"] == 2 and roomy["landmark"] == 1
    assert tight["tagging"] == cfg.stages["tagging"].resources.min_actors == 1
    assert "voting" not in roomy  # model-free stages run as tasks


def test_the_driver_caps_malloc_arenas_unless_the_user_set_them():
    """pipeline.run.limit_malloc_arenas in a fresh process: set on glibc, left alone when
    MALLOC_ARENA_MAX already says how many."""
    code = "from groundmill.pipeline.run import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def run(extra: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env | extra, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    assert run({}) == "True"
    assert run({"MALLOC_ARENA_MAX": "4"}) == "False"
