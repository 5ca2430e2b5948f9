"""Shared fixtures. Ray starts once per test session (it costs seconds), on 2 CPUs like CI."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Many model actors start at once on 2 cores; Ray's default 60 s registration timeout kills slow ones.
os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
