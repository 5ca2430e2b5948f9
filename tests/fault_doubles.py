"""TEST DOUBLES: stages that fail on purpose, for the fault-injection tests (never registered in the
package). `use_doubles` registers them; the graph ships the resolved classes to the Ray workers,
which import this module by name (`groundmill.tests.fault_doubles`).

`python -m groundmill.tests.fault_doubles ARGS` is `groundmill ARGS` with the doubles registered,
for tests that run (and kill) the pipeline in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import groundmill.stages
from groundmill.shards import INDEX_DIR, SHARDS_DIR, iter_shard, read_index
from groundmill.stages.base import Sample, SampleError, Stage


class RaiseOnUriDouble(Stage):
    """Raises a plain exception (a stage bug) for any sample whose URI contains `marker`."""

    name = "raise_on_uri"
    provides = ("fault_double",)

    @dataclass
    class Params:
        marker: str = "broken"

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            if self.params.marker in s.uri:
                raise RuntimeError(f"injected failure on {Path(s.uri).name}")
            s.record["fault_double"] = "seen"


class RaiseOnUriTaskDouble(RaiseOnUriDouble):
    """The same, run as a Ray task (a model-free stage) instead of an actor."""

    uses_model = False


class CrashOnceDouble(Stage):
    """SIGKILLs its own actor process on its first batch (as an OOM kill would); `marker` (a file)
    makes the restarted actor go on normally."""

    name = "crash_once"
    provides = ("fault_double",)

    @dataclass
    class Params:
        marker: str = ""

    def process(self, samples: list[Sample]) -> None:
        marker = Path(self.params.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        for s in samples:
            s.record["fault_double"] = "survived"


class SlowDouble(Stage):
    """Sleeps per sample, so a test can kill the driver while shards are still being written."""

    name = "slow"
    provides = ("fault_double",)

    @dataclass
    class Params:
        seconds: float = 0.2

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            time.sleep(self.params.seconds)
            if not s.key:
                raise SampleError("sample without key")
            s.record["fault_double"] = "slow"


class HandBuiltObjectsDouble(Stage):
    """Writes two fixed objects into every image, standing in for detection + voting, so the real
    language stages after it have something to describe without vision models."""

    name = "hand_built_objects"
    provides = ("objects",)
    uses_model = False

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            s.record["objects"] = [
                {"id": 0, "bbox": [4, 4, 40, 40], "labels": ["dog"], "attributes": ["brown"], "score": 0.9,
                 "detectors": ["double"]},
                {"id": 1, "bbox": [50, 10, 90, 60], "labels": ["ball"], "attributes": ["red"], "score": 0.8,
                 "detectors": ["double"]},
            ]  # fmt: skip


def kill_mid_run(module: str, args: list[str], out: Path) -> int:
    """Run `python -m groundmill.tests.<module> ARGS` in a session of its own, SIGKILL its driver as
    soon as `out` has committed a shard (then its embedded Ray, so nothing outlives the test), and
    return how many index rows the killed run had committed."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", f"groundmill.tests.{module}", *args], cwd=Path(__file__).resolve().parents[1],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # generous: Ray start-up on a busy 2-core machine
        while not list((out / INDEX_DIR).glob("*.parquet")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard committed within 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return len(read_index(out))


def assert_exactly_once(out: Path, uris: list[str]) -> list[dict]:
    """Every input has exactly one index row; every ok key is in exactly one tar, exactly once, and
    every visible tar is committed (has its index part); no temp files are left."""
    rows = read_index(out).to_pylist()
    assert Counter(r["uri"] for r in rows) == Counter(uris)
    tar_keys = Counter(key for tar in (out / SHARDS_DIR).glob("*.tar") for key, _ in iter_shard(tar))
    ok_keys = [r["key"] for r in rows if r["status"] == "ok" and r["shard"]]
    assert tar_keys == Counter(ok_keys)
    committed = {p.stem for p in (out / INDEX_DIR).glob("*.parquet")}
    assert {p.stem for p in (out / SHARDS_DIR).glob("*.tar")} <= committed
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    return rows


DOUBLES: dict[str, type[Stage]] = {
    "hand_built_objects": HandBuiltObjectsDouble,
    "raise_on_uri": RaiseOnUriDouble,
    "raise_on_uri_task": RaiseOnUriTaskDouble,
    "crash_once": CrashOnceDouble,
    "slow": SlowDouble,
}


def use_doubles(setitem: Callable[[dict, str, object], None] = dict.__setitem__) -> None:
    """Register DOUBLES as stage types (pass pytest's `monkeypatch.setitem` to undo it after a test)."""
    for name, cls in DOUBLES.items():
        setitem(groundmill.stages.REGISTRY, name, cls)


if __name__ == "__main__":
    from groundmill.pipeline.cli import main

    use_doubles()
    sys.exit(main(sys.argv[1:]))
