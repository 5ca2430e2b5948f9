"""Scaling measured on real Ray nodes, the GPU figures, and the resource overrides of graph operators.

`loopback_cluster(nodes)` starts a head and `nodes - 1` more nodes on this machine (loopback, one
CPU each, with the node settings the README asks of a cluster, as tests/test_cluster.py does), so
1 vs 2 nodes is the same pipeline on twice the machines; `planner_two_vs_one` is
`pipeline/plan.py`'s prediction for the same change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from groundmill.benchmarks.measure import QUIET_SLOW_START
from groundmill.pipeline.run import RAY_NODE_ENV

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_flags(cpus: int, ray_tmp: str) -> list[str]:
    """One node's flags: its CPUs, loopback, and fresh agent ports (defaults clash between nodes)."""
    ports = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--num-cpus={cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--block", f"--temp-dir={ray_tmp}",
            *(f"--{p}={_free_port()}" for p in ports)]  # fmt: skip


def _wait_for_nodes(address: str, env: dict[str, str], n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=env,
                                capture_output=True, text=True)  # fmt: skip
        if status.returncode == 0 and status.stdout.count("node_") >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"the loopback cluster did not reach {n} nodes")


def kill_trees(procs: list[subprocess.Popen]) -> None:
    """SIGKILL exactly the processes started here and their descendants (not other Ray on the machine)."""
    victims = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(proc.pid)
            victims += [parent, *parent.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)


@contextlib.contextmanager
def loopback_cluster(nodes: int, cpus_per_node: int = 1) -> Iterator[str]:
    """A Ray cluster of `nodes` nodes on this machine; yields the head's address."""
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="gmbench", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**RAY_NODE_ENV, **os.environ, **QUIET_SLOW_START, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    procs: list[subprocess.Popen] = []
    address = f"127.0.0.1:{port}"
    try:
        head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false"]
        procs.append(subprocess.Popen([*head, *_node_flags(cpus_per_node, ray_tmp)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        _wait_for_nodes(address, env, 1)
        for _ in range(nodes - 1):
            worker = [str(BIN / "ray"), "start", f"--address={address}", *_node_flags(cpus_per_node, ray_tmp)]
            procs.append(
                subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        _wait_for_nodes(address, env, nodes)
        yield address
    finally:
        kill_trees(procs)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def planner_two_vs_one(manifest: str, overrides: list[str], out: Path, images: int) -> float:
    """pipeline/plan.py's predicted throughput on two one-CPU nodes over one, from a run's timings."""
    from groundmill.pipeline.config import load_config
    from groundmill.pipeline.plan import make_plan, measured_costs

    cfg = load_config(manifest, ["inputs=[.]", *overrides])
    costs = measured_costs(out)
    wall = {
        cpus: make_plan(cfg, costs, images, 0.0, 1, cpus, 0.0, 1.0, str(out)).wall_hours for cpus in (1, 2)
    }
    return wall[1] / wall[2]


def segment_overrides(manifest: str, names: set[str] | None, **resources: float) -> list[str]:
    """Overrides setting resources of the named graph operators (a group, or a stage alone), or of
    every operator that holds a model when `names` is None."""
    from groundmill.pipeline.config import load_config, segments

    cfg = load_config(manifest, ["inputs=[.]"])
    out = []
    for seg in segments(cfg):
        if (seg.name in names) if names is not None else seg.uses_model:
            prefix = f"groups.{seg.name}" if seg.name in cfg.groups else f"stages.{seg.name}.resources"
            out += [f"{prefix}.{key}={value}" for key, value in resources.items()]
    return out


def gpu_stage_figures(rows: list[dict[str, Any]], gpus_per_stage: dict[str, float], seconds: float,
                      actors: dict[str, int]) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per stage, from index rows' `timings`: seconds per image, GPU-seconds per image (times the
    GPUs its actor holds) and busy share (summed busy time over wall-clock x its actors)."""
    from groundmill.pipeline.plan import timing_pairs

    busy: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["media_type"] == "image":
            for stage, t in timing_pairs(row["timings"]):
                busy[stage].append(t)
    figures = {}
    for stage, gpus in gpus_per_stage.items():
        times = busy.get(stage, [])
        mean = sum(times) / len(times) if times else 0.0
        figures[stage] = {"s_per_image": mean, "gpu_s_per_image": mean * gpus,
                          "busy_share": sum(times) / (seconds * actors[stage]) if seconds else 0.0}  # fmt: skip
    return figures


def gpu_figures(manifest: str, inputs: Path, work: Path, gpus: int) -> dict[str, Any]:
    """6. With a GPU: every model operator on 0.25 GPU, one run, per-stage GPU-seconds and busy share."""
    if not gpus:
        return {"skipped": "no GPU"}
    from groundmill.benchmarks.measure import run_pipeline_measured
    from groundmill.pipeline.config import load_config, segments
    from groundmill.shards import read_index

    overrides = segment_overrides(manifest, None, num_gpus=0.25)
    run = run_pipeline_measured(manifest, inputs, work, "gpu", overrides)
    cfg = load_config(manifest, ["inputs=[.]", *overrides])
    share = {n: seg.stage_resources(n) for seg in segments(cfg) for n in seg.stages}
    rows = read_index(work / "out-gpu", columns=["media_type", "timings"]).to_pylist()
    stages = gpu_stage_figures(rows, {n: r.num_gpus for n, r in share.items()}, run["seconds"],
                               {n: r.max_actors for n, r in share.items()})  # fmt: skip
    return {"gpus": gpus, "samples_per_s": run["samples_per_s"], "stages": stages,
            "gpu_s_per_image": sum(s["gpu_s_per_image"] for s in stages.values())}  # fmt: skip
