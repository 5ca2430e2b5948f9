"""What every stage is: one class per step, with declared resources, a `setup` that loads its model
once per actor, and a batch call that annotates samples in place.

A stage never sees Ray. `pipeline.graph` wraps it in an actor (model stages) or a task (cheap CPU
work), turns Ray blocks into :class:`Sample` objects, isolates per-sample failures into error rows,
and times each call.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image

from groundmill.media import decode_rgb
from groundmill.schema import STATUS_ERROR, STATUS_OK, FrameRecord, Record, frame_records

# Between stages a row carries the stored media and the record as JSON, so a block is plain Arrow.
ROW_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("key", pa.string()),
        ("media_type", pa.string()),
        ("data", pa.binary()),
        ("frames", pa.list_(pa.binary())),
        ("record", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("timings", pa.string()),
        ("stats", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)
STATUS_DUPLICATE = "duplicate"  # internal: the index row says "ok" with duplicate_of set


@dataclass
class ModelSpec:
    # A hub id ("google/owlv2-base-patch16"), a local directory or file, or "tiny": the same model
    # class built from a small config with random weights (offline tests, the demo).
    id: str = "tiny"
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto -> cuda when the actor has a GPU, else cpu

    @property
    def is_random(self) -> bool:
        return self.id == "tiny"


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # a fraction packs several actors on one GPU
    batch_size: int = 4
    min_actors: int = 1
    max_actors: int = 1


class SampleError(Exception):
    """Raised by a stage for one sample that cannot be annotated; the sample becomes an error row,
    with `code` (a `schema.ErrorCode`) when the stage knows why: `--retry-errors` reads it."""

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(reason)
        self.code = code


@dataclass
class View:
    """One image a stage annotates: an image sample, or one keyframe of a video."""

    sample: Sample
    index: int  # 0 for an image, the keyframe's position for a video
    record: FrameRecord  # where the stage writes (the record itself, or a keyframe sub-record)

    @property
    def data(self) -> bytes:
        return self.sample.frames[self.index] if self.sample.media_type == "video" else self.sample.data

    @property
    def image(self) -> Image.Image:
        """Decoded once per sample in an actor: a group's stages share it. Treat it as read-only."""
        return self.sample.image(self.index)


@dataclass
class Sample:
    """One row flowing through the pipeline; :data:`ROW_SCHEMA` is its Arrow form between stages."""

    uri: str
    key: str
    media_type: str
    data: bytes
    frames: list[bytes]  # video keyframes (JPEG), aligned with record["keyframes"]
    record: Record
    status: str = STATUS_OK
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    duplicate_of: str | None = None  # set (with status "duplicate") when another input has this content
    _images: dict[int, Image.Image] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def fail(self, stage: str, reason: str) -> None:
        """Make this sample an error row; later stages skip it and the index records the reason."""
        self.status = STATUS_ERROR
        self.error = f"{stage}: {reason}"[:2000]

    def views(self) -> list[View]:
        if self.media_type == "video":
            records = frame_records(self.record)
            if len(records) != len(self.frames):
                raise ValueError(f"{len(self.frames)} keyframes but {len(records)} keyframe records")
            return [View(self, i, r) for i, r in enumerate(records)]
        return [View(self, 0, self.record)]

    def image(self, index: int) -> Image.Image:
        """The `index`-th picture (the image, or a keyframe) as RGB, decoded on first use only."""
        if index not in self._images:
            self._images[index] = decode_rgb(self.frames[index] if self.media_type == "video" else self.data)
        return self._images[index]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sample:
        return cls(
            uri=row["uri"],
            key=row["key"],
            media_type=row["media_type"],
            data=row["data"],
            frames=list(row["frames"]),
            record=json.loads(row["record"]),
            status=row["status"],
            error=row["error"],
            timings=json.loads(row["timings"]),
            stats=json.loads(row["stats"]),
            duplicate_of=row["duplicate_of"],
        )

    def to_row(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "key": self.key,
            "media_type": self.media_type,
            "data": self.data,
            "frames": self.frames,
            "record": json.dumps(self.record),
            "status": self.status,
            "error": self.error,
            "timings": json.dumps(self.timings),
            "stats": json.dumps(self.stats),
            "duplicate_of": self.duplicate_of,
        }


# Record fields every sample has before the first stage (written by the loader).
LOADED_FIELDS = ("source", "media", "normalisation", "keyframes", "sparse_frames")


class Stage(ABC):
    """Base class of a pipeline step.

    Subclasses set `name`, `provides` (record fields they write), `requires` (fields that must
    already be there), `uses` (fields read when an earlier stage wrote them), nest a `Params`
    dataclass (validated from the manifest), and implement `process`. Model stages load their model
    in `setup`, which runs once per actor, and release what it holds (servers, clients) in `teardown`.
    The manifest's stage order is checked against these declarations before a run starts.
    """

    name: ClassVar[str]
    provides: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = True  # False: cheap CPU logic, run as Ray tasks instead of actors
    # False: reads only the record, never the pixels; a derived run (`--from`) whose rerun stages
    # all say so decodes no video keyframes.
    uses_pixels: ClassVar[bool] = True

    @dataclass
    class Params:
        pass

    def __init__(
        self,
        params: Any = None,
        model: ModelSpec | None = None,
        resources: Resources | None = None,
        seed: int = 0,
        stage_id: str | None = None,
    ):
        self.params = params if params is not None else self.Params()
        self.seed = seed
        self.model_spec = model or ModelSpec()
        self.resources = resources or Resources()
        self.stage_id = stage_id or self.name  # the manifest's key: two stages of one type differ by it

    def setup(self) -> None:  # noqa: B027 - stages without a model have nothing to load
        """Load models; called once per actor before the first batch."""

    def teardown(self) -> None:  # noqa: B027 - most stages hold nothing to release
        """Release what `setup` opened (LLM backends, HTTP clients); called once when the actor ends."""

    @abstractmethod
    def process(self, samples: list[Sample]) -> None:
        """Annotate `samples` in place (all have status ok). Raise SampleError for a bad sample."""

    def provenance(self) -> dict[str, Any]:
        """What produced this stage's output: recorded in every record and in run.json."""
        info: dict[str, Any] = {}
        if self.uses_model:
            from groundmill.stages.hub import random_weights  # hub imports this module

            info["model"] = self.model_spec.id
            info["random_weights"] = random_weights(self.model_spec)
        return info


def views_of(samples: list[Sample]) -> list[View]:
    """All images of a batch, flattened, so a model stage batches keyframes and images together."""
    return [v for s in samples for v in s.views()]
