"""TEST DOUBLES: three small stages for the derived-run tests (never registered in the package): `paint`
reads the pixels and writes `paint`, `describe` requires `paint`, `stamp` depends on nothing, and
`flaky` fails with a transient or a permanent code. `use_derive_doubles` registers them; the graph
ships the resolved classes to the Ray workers.

`python -m groundmill.tests.derive_doubles ARGS` is `groundmill ARGS` with the doubles registered,
for tests that run (and kill) a derived run in a subprocess.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import groundmill.stages
from groundmill.schema import ErrorCode
from groundmill.stages.base import Sample, SampleError, Stage


class PaintDouble(Stage):
    """Writes `{colour}:{width}x{height}` (decoding the image), after `seconds` of sleep per sample."""

    name = "paint"
    provides = ("paint",)

    @dataclass
    class Params:
        colour: str = "red"
        seconds: float = 0.0

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            time.sleep(self.params.seconds)
            width, height = s.image(0).size
            s.record["paint"] = f"{self.params.colour}:{width}x{height}"
            s.stats["paint.calls"] = 1.0


class DescribeDouble(Stage):
    name = "describe"
    provides = ("description",)
    requires = ("paint",)
    uses_model = False
    uses_pixels = False

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            s.record["description"] = f"painted {s.record['paint']}"


class StampDouble(Stage):
    name = "stamp"
    provides = ("stamp",)
    uses_model = False
    uses_pixels = False

    @dataclass
    class Params:
        text: str = "first"

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            s.record["stamp"] = self.params.text


class FlakyDouble(Stage):
    """Fails samples whose URI contains `permanent` (unclassified: always), and those whose URI
    contains `transient` with a timeout while the file `outage` exists; the others get `flaky: ok`."""

    name = "flaky"
    provides = ("flaky",)
    uses_model = False
    uses_pixels = False

    @dataclass
    class Params:
        outage: str = ""

    def process(self, samples: list[Sample]) -> None:
        for s in samples:
            if "permanent" in s.uri:
                raise SampleError("this input always breaks the stage")
            if "transient" in s.uri and Path(self.params.outage).exists():
                raise SampleError("the model server did not answer in 1s", code=ErrorCode.TIMEOUT)
            s.record["flaky"] = "ok"


DOUBLES: dict[str, type[Stage]] = {
    "paint": PaintDouble,
    "describe": DescribeDouble,
    "stamp": StampDouble,
    "flaky": FlakyDouble,
}


def use_derive_doubles(setitem: Callable[[dict, str, object], None] = dict.__setitem__) -> None:
    """Register DOUBLES as stage types (pass pytest's `monkeypatch.setitem` to undo it after a test)."""
    for name, cls in DOUBLES.items():
        setitem(groundmill.stages.REGISTRY, name, cls)


if __name__ == "__main__":
    from groundmill.pipeline.cli import main

    use_derive_doubles()
    sys.exit(main(sys.argv[1:]))
