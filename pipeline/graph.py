"""The Ray Data graph: inputs -> load -> stages -> shard sink, streamed with bounded memory.

Model stages run as actor pools (`setup` once per actor); cheap CPU stages run as tasks; the
consecutive stages of a group (config `groups`) share one operator. A stage that fails on a batch is
retried one sample at a time, so only the sample that breaks it becomes an error row.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset, TaskPoolStrategy

from groundmill.pipeline.config import Config, ConfigError, Segment, StageConfig, segments
from groundmill.pipeline.load import load_batch
from groundmill.schema import ErrorCode, error_reason
from groundmill.stages import stage_class
from groundmill.stages.base import ROW_SCHEMA, Sample, SampleError, Stage
from groundmill.stages.llm.base import LLMUnavailable


def build_stage(name: str, cfg: StageConfig, seed: int, cls: type[Stage] | None = None) -> Stage:
    return (cls or stage_class(cfg.type or name))(cfg.params, cfg.model, cfg.resources, seed, stage_id=name)


def failure_code(exc: BaseException) -> str | None:
    """The `schema.ErrorCode` of a stage failure when its kind says it, else None (unclassified: a
    stage bug, or an input the stage cannot handle)."""
    if isinstance(exc, SampleError):
        return exc.code
    if isinstance(exc, TimeoutError):  # before OSError, which it subclasses
        return ErrorCode.TIMEOUT
    if isinstance(exc, LLMUnavailable):
        return ErrorCode.LLM_UNAVAILABLE
    if isinstance(exc, OSError):
        return ErrorCode.IO
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        return ErrorCode.OUT_OF_MEMORY
    return None


def _fail(sample: Sample, stage: str, exc: BaseException) -> None:
    reason = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
    code = failure_code(exc)
    sample.fail(stage, error_reason(code, reason) if code else reason)


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


def _cuda() -> Any:
    """torch.cuda when this process has initialised it (a GPU stage ran here), else None."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_initialized() else None


def _elapsed(start: float) -> float:
    """Seconds since `start`, after the GPU's queued work is done: timings are GPU-synchronised."""
    if (cuda := _cuda()) is not None:
        cuda.synchronize()
    return time.perf_counter() - start


def _run_chunk(stage: Stage, name: str, todo: list[Sample]) -> None:
    start = time.perf_counter()
    try:
        stage.process(todo)
        per_sample = _elapsed(start) / len(todo)
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
            s.timings[name] = _elapsed(one_start)


def _samples(batch: pa.Table) -> list[Sample]:
    return [Sample.from_row(row) for row in batch.to_pylist()]


def _table(samples: list[Sample]) -> pa.Table:
    return pa.Table.from_pylist([s.to_row() for s in samples], schema=ROW_SCHEMA)


StageSpecs = list[tuple[str, StageConfig, type[Stage]]]


def run_stages(stages: list[tuple[str, Stage]], batch: pa.Table) -> pa.Table:
    samples = _samples(batch)
    annotate(stages, samples)
    return _table(samples)


def annotate(stages: list[tuple[str, Stage]], samples: list[Sample]) -> None:
    for name, stage in stages:
        run_stage(stage, name, samples)


class StageActor:
    """A Ray actor around one stage, or a group's stages: models load once, then batches stream
    through them in order."""

    def __init__(self, specs: StageSpecs, seed: int):
        self.stages = [(name, build_stage(name, cfg, seed, cls)) for name, cfg, cls in specs]
        for _, stage in self.stages:
            stage.setup()
        self.dataset: str | None = None  # the Dataset whose proxy holds this actor (a long-lived pool)

    def __call__(self, batch: pa.Table) -> pa.Table:
        samples = _samples(batch)
        annotate(self.stages, samples)
        if (cuda := _cuda()) is not None:  # this actor's peak so far, for the GPU benchmark
            peak = round(cuda.max_memory_allocated() / 2**20, 1)
            for s in samples:
                s.stats[f"gpu_peak_mib.{'+'.join(n for n, _ in self.stages)}"] = peak
        if (torch := sys.modules.get("torch")) is not None:  # the benchmark matches this thread count
            for s in samples:
                s.stats[f"threads.{'+'.join(n for n, _ in self.stages)}"] = torch.get_num_threads()
        return _table(samples)

    def claim(self, dataset: str) -> bool:
        """Whether a proxy of `dataset` may take this actor (each actor serves one proxy per Dataset)."""
        if self.dataset == dataset:
            return False
        self.dataset = dataset
        return True

    def close(self) -> None:
        teardown(self.stages)
        self.stages = []

    def __del__(self) -> None:  # Ray Data deletes the UDF when the actor shuts down gracefully
        teardown(self.stages)


class PooledStage:
    """Ray Data UDF (a CPU-free actor) that forwards batches to one actor of a long-lived StageActor
    pool: a run of several Datasets loads its models once instead of once per Dataset."""

    def __init__(self, actors: list[Any], dataset: str):
        for actor in actors:
            if ray.get(actor.claim.remote(dataset)):
                self.actor = actor
                return
        raise RuntimeError(f"{dataset}: more proxies than pooled actors ({len(actors)})")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return ray.get(self.actor.__call__.remote(batch))


Pools = dict[str, list[Any]]  # operator name -> its long-lived StageActor handles


def pool_sizes(cfg: Config, cluster: dict[str, float]) -> dict[str, int]:
    """Actors per model operator of a long-lived pool: every pool at max_actors when the cluster holds
    them all beside loading, else at min_actors (a fixed pool cannot grow on demand)."""
    model_segs = [seg for seg in segments(cfg) if seg.uses_model]
    need = {"CPU": cfg.load.num_cpus, "GPU": 0.0}
    for seg in model_segs:
        need["CPU"] += seg.resources.max_actors * seg.resources.num_cpus
        need["GPU"] += seg.resources.max_actors * seg.resources.num_gpus
    fits = all(amount <= cluster.get(kind, 0.0) + 1e-9 for kind, amount in need.items())
    return {seg.name: seg.resources.max_actors if fits else seg.resources.min_actors for seg in model_segs}


def start_pools(cfg: Config, cluster: dict[str, float]) -> Pools:
    """One long-lived StageActor pool per model operator, to outlive the run's Datasets."""
    pools, sizes = {}, pool_sizes(cfg, cluster)
    actor_cls = ray.remote(StageActor)
    for seg in segments(cfg):
        if seg.uses_model:
            r, specs = seg.resources, operator_specs(seg)
            options = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "max_restarts": -1}
            pools[seg.name] = [
                actor_cls.options(**options).remote(specs, cfg.run.seed) for _ in range(sizes[seg.name])
            ]
    return pools


def stop_pools(pools: Pools) -> None:
    actors = [a for pool in pools.values() for a in pool]
    ray.get([a.close.remote() for a in actors])
    for actor in actors:
        ray.kill(actor)


def teardown(stages: list[tuple[str, Stage]]) -> None:
    for _, stage in stages:
        stage.teardown()


def stage_task(batch: pa.Table, specs: StageSpecs, seed: int) -> pa.Table:
    """Model-free stages as a plain Ray task."""
    stages = [(name, build_stage(name, cfg, seed, cls)) for name, cfg, cls in specs]
    try:
        return run_stages(stages, batch)
    finally:
        teardown(stages)


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


def operator_specs(seg: Segment) -> StageSpecs:
    """(name, config, class) of an operator's stages, each config with the resources the stage gets in
    that operator's actor (see `Segment.stage_resources`). Classes are resolved here and shipped to
    the workers, whose own registry lacks stages registered at runtime."""
    return [
        (
            name,
            dataclasses.replace(stage_cfg, resources=seg.stage_resources(name)),
            stage_class(stage_cfg.type or name),
        )
        for name, stage_cfg in seg.stages.items()
    ]


def build_dataset(
    cfg: Config, items: list[dict[str, Any]], registry: Any, pools: Pools | None = None, dataset: str = ""
) -> Dataset:
    """The lazy Ray Data graph for `items` ({uri, failure}: see load_batch); nothing runs until it is
    written. With `pools` (see start_pools), model operators forward to those long-lived actors."""
    batch_size = cfg.load.batch_size
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
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
    return add_stages(ds, cfg, pools, dataset)


def add_stages(ds: Dataset, cfg: Config, pools: Pools | None = None, dataset: str = "") -> Dataset:
    """The enabled stages of `cfg` after `ds` (loaded samples), one operator per segment; model
    segments forward to `pools` when given (their actors outlive this Dataset)."""
    for seg in segments(cfg):
        r = seg.resources
        common = {"batch_format": "pyarrow", "batch_size": r.batch_size, "num_cpus": r.num_cpus}
        specs = operator_specs(seg)
        if seg.uses_model and pools:
            actors = pools[seg.name]
            ds = ds.map_batches(
                PooledStage,
                fn_constructor_args=(actors, dataset),
                compute=ActorPoolStrategy(size=len(actors)),
                batch_format="pyarrow",
                batch_size=r.batch_size,
                num_cpus=0,
            )
        elif seg.uses_model:
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
