"""A real two-node Ray cluster on loopback: `ray start --head` plus a second node joining it, the demo
manifest submitted with `ray job submit` (working dir = the repo), and the same sample keys as an
embedded run.

The cluster is stopped by killing exactly the process trees this test started (`ray stop --force`
would kill every Ray process on the machine, including this test session's own embedded Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from groundmill.benchmarks.cluster import kill_trees
from groundmill.pipeline.config import load_config
from groundmill.pipeline.run import RAY_NODE_ENV, run_pipeline
from groundmill.shards import read_index
from groundmill.tests.media_factory import rgb_jpeg

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    """Fresh ports for one node's agents: the defaults clash with any other Ray on this machine
    (this session's embedded one, the other node), and the job agent then never comes up."""
    flags = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--{flag}={_free_port()}" for flag in flags]


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for_nodes(address: str, env: dict, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={address}"], env=env, capture_output=True, text=True
        )
        if result.returncode == 0 and result.stdout.count("node_") >= n:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not reach {n} nodes: {result.stdout}{result.stderr}")


def test_job_on_a_two_node_loopback_cluster_writes_the_embedded_runs_keys(tmp_path, ray_local):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        (inputs / f"img{i}.jpg").write_bytes(rgb_jpeg(seed=i + 1))

    def manifest(out: Path) -> Path:
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(
            f"run: {{name: cluster}}\ninputs: [{inputs}]\noutput: {{dir: {out}, shard_max_samples: 2}}\n"
            "stages:\n  tagging:\n    model: {id: tiny}\n    resources: {batch_size: 2}\n    params: {top_k: 3}\n"
        )
        return path

    run_pipeline(load_config(manifest(tmp_path / "embedded")))
    embedded_keys = set(read_index(tmp_path / "embedded").column("key").to_pylist())

    port, dashboard_port = _free_port(), _free_port()
    # Short temp dir: Ray's unix socket paths must stay under ~107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="gmray", dir="/tmp")
    env = {
        **RAY_NODE_ENV,  # what the README asks of every node
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--block", f"--temp-dir={ray_tmp}"]
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}", "--include-dashboard=true", *common, *_agent_ports()]  # fmt: skip
        procs.append(_start(head, env, logs / "head.log"))
        _wait_for_nodes(f"127.0.0.1:{port}", env, 1)
        worker = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common, *_agent_ports()]
        procs.append(_start(worker, env, logs / "worker.log"))
        _wait_for_nodes(f"127.0.0.1:{port}", env, 2)

        out = tmp_path / "cluster"
        submit = [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard_port}",
                  f"--working-dir={REPO}", "--runtime-env-json", json.dumps({"excludes": [".git", "out", ".venv"]}),
                  "--", "groundmill", "run", str(manifest(out))]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the head's job agent comes up a little after the node registers
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout
        rows = read_index(out).to_pylist()
        assert {r["key"] for r in rows} == embedded_keys
        assert all(r["status"] == "ok" for r in rows) and len(rows) == 4
        run_record = json.loads((out / "run.json").read_text())
        assert run_record["status"] == "complete"
    finally:
        kill_trees(procs)
        shutil.rmtree(ray_tmp, ignore_errors=True)
