"""The Ray Data graph: inputs -> load -> stages -> shard sink, streamed with bounded memory.

Model stages run as actor pools (`setup` once per actor); cheap CPU stages run as tasks; the
consecutive stages of a group (config `groups`) share one operator. A stage that fails on a batch is
retried one sample at a time, so only the sample that breaks it becomes an error row.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset, TaskPoolStrategy

from groundmill.pipeline.config import Config, ConfigError, StageConfig, segments
from groundmill.pipeline.load import load_batch
from groundmill.stages import stage_class
from groundmill.stages.base import ROW_SCHEMA, Sample, SampleError, Stage


def build_stage(name: str, cfg: StageConfig, seed: int, cls: type[Stage] | None = None) -> Stage:
    return (cls or stage_class(cfg.type or name))(cfg.params, cfg.model, cfg.resources, seed)


def _fail(sample: Sample, stage: str, exc: BaseException) -> None:
    sample.fail(stage, str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}")


def run_stage(stage: Stage, name: str, samples: list[Sample]) -> None:
    """Run one stage over the ok samples of a batch in its own batch size, isolating failures and
    timing each sample."""
    todo = [s for s in samples if s.ok]
    size = stage.resources.batch_size
    for i in range(0, len(todo), size):
        _run_chunk(stage, name, todo[i : i + size])
    provenance = stage.provenance()
    for s in todo:
        if s.ok:
            s.record.setdefault("provenance", {})[name] = provenance


def _run_chunk(stage: Stage, name: str, todo: list[Sample]) -> None:
    start = time.perf_counter()
    try:
        stage.process(todo)
        per_sample = (time.perf_counter() - start) / len(todo)
        for s in todo:
            s.timings[name] = per_sample
    except Exception as batch_error:
        if len(todo) == 1:
            _fail(todo[0], name, batch_error)
            return
        for s in todo:  # find the sample(s) that break the batch; the others are annotated
            one_start = time.perf_counter()
            try:
                stage.process([s])
            except Exception as e:
                _fail(s, name, e)
            s.timings[name] = time.perf_counter() - one_start


def _samples(batch: pa.Table) -> list[Sample]:
    return [Sample.from_row(row) for row in batch.to_pylist()]


def _table(samples: list[Sample]) -> pa.Table:
    return pa.Table.from_pylist([s.to_row() for s in samples], schema=ROW_SCHEMA)


StageSpecs = list[tuple[str, StageConfig, type[Stage]]]


def run_stages(stages: list[tuple[str, Stage]], batch: pa.Table) -> pa.Table:
    samples = _samples(batch)
    for name, stage in stages:
        run_stage(stage, name, samples)
    return _table(samples)


class StageActor:
    """A Ray actor around one stage, or a group's stages: models load once, then batches stream
    through them in order."""

    def __init__(self, specs: StageSpecs, seed: int):
        self.stages = [(name, build_stage(name, cfg, seed, cls)) for name, cfg, cls in specs]
        for _, stage in self.stages:
            stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_stages(self.stages, batch)


def stage_task(batch: pa.Table, specs: StageSpecs, seed: int) -> pa.Table:
    """Model-free stages as a plain Ray task."""
    return run_stages([(name, build_stage(name, cfg, seed, cls)) for name, cfg, cls in specs], batch)


def check_resources(cfg: Config, cluster: dict[str, float]) -> None:
    """Fail fast when the actor pools cannot all start: Ray would otherwise wait forever for them.

    Every model stage keeps at least `min_actors` actors alive for the whole run, and the load and
    write tasks need room beside them.
    """
    need = {"CPU": cfg.load.num_cpus, "GPU": 0.0}
    pools = []
    for seg in segments(cfg):
        r = seg.resources
        if seg.uses_model:
            need["CPU"] += r.min_actors * r.num_cpus
            need["GPU"] += r.min_actors * r.num_gpus
            pools.append(
                f"{seg.name}={r.min_actors}x{r.num_cpus:g}cpu" + (f"+{r.num_gpus:g}gpu" if r.num_gpus else "")
            )
    for kind, amount in need.items():
        have = cluster.get(kind, 0.0)
        if amount > have + 1e-9:
            raise ConfigError(
                f"key 'stages.*.resources': the actor pools need {amount:g} {kind} at least "
                f"(load {cfg.load.num_cpus:g} cpu; {', '.join(pools)}) but the Ray cluster has {have:g}; "
                f"lower resources.num_cpus/num_gpus or min_actors, or raise ray.num_cpus"
            )


def build_dataset(cfg: Config, uris: list[str], registry: Any) -> Dataset:
    """The lazy Ray Data graph for `uris`; nothing runs until it is written."""
    batch_size = cfg.load.batch_size
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=max(1, len(uris) // batch_size))
    ds = ds.map_batches(
        load_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={
            "limits": cfg.limits,
            "video": cfg.video,
            "registry": registry,
            "image_format": cfg.output.image_format,
        },
        num_cpus=cfg.load.num_cpus,
    )
    for seg in segments(cfg):
        r = seg.resources
        common = {"batch_format": "pyarrow", "batch_size": r.batch_size, "num_cpus": r.num_cpus}
        # Classes resolved here and shipped to the workers, whose own registry lacks stages registered at runtime.
        specs = [
            (name, stage_cfg, stage_class(stage_cfg.type or name)) for name, stage_cfg in seg.stages.items()
        ]
        if seg.uses_model:
            ds = ds.map_batches(
                StageActor,
                fn_constructor_args=(specs, cfg.run.seed),
                compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
                num_gpus=r.num_gpus,
                **common,
            )
        else:
            ds = ds.map_batches(
                stage_task,
                fn_kwargs={"specs": specs, "seed": cfg.run.seed},
                compute=TaskPoolStrategy(size=r.max_actors) if r.max_actors > 1 else None,
                **common,
            )
    return ds
