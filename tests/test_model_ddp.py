"""DDP under torchrun on CPU: two gloo processes train the tiny config in sync."""

import json
import os
import socket
import subprocess
import sys

from groundmill.model.bench import TINY
from groundmill.model.synthetic import write_split
from groundmill.tests.model_fixtures import FAST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_log(path):
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_two_gloo_ranks_stay_in_sync_over_an_odd_number_of_shards(tmp_path):
    # Three shards (two of images, one of videos) for two ranks: the streams are endless per rank, so
    # neither waits for the other.
    write_split(tmp_path / "train", images=24, videos=6, seed=5, per_shard=12)
    assert len(list((tmp_path / "train").rglob("*.tar"))) == 3
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "groundmill.model.train", str(TINY),
        f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'train'}}}]", *FAST,
        "threads=1", "device=cpu", "optim.max_steps=3", "optim.grad_accum=2", "ckpt_every=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (rank_log(tmp_path / "run" / n) for n in ("metrics.jsonl", "metrics-rank1.jsonl"))
    assert set(rank0) == set(rank1) == {1, 2, 3}
    assert rank0[1]["loss"] != rank1[1]["loss"]  # each rank its own batches...
    for step in (1, 2, 3):  # ...one model: the same mean loss and the same weights on both
        assert rank0[step]["global_loss"] == rank1[step]["global_loss"]
        assert rank0[step]["weights"] == rank1[step]["weights"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert set(state["data"]) == {"0", "1"}  # both ranks' stream positions, for the resume
