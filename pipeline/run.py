"""One run: output ownership, resume state, Ray start-up, the graph, and the run record (run.json).

Resume is by construction: an input whose URI has a committed index row is done. A rerun of a
killed run removes uncommitted files, redoes shards that went missing or were truncated since their
commit, skips what is done and annotates the rest; a rerun of a finished run finds nothing pending
and returns without starting Ray. A rerun whose annotation settings differ from those that wrote
the output is refused, naming what changed: write a derived output instead (`--from`,
pipeline/derive.py), which reruns only the stages whose settings changed.

Outputs stay owned: a run writes only into an empty directory or one holding groundmill's marker
(:data:`MARKER`), holds an exclusive lock on it (:data:`LOCK`) for its whole length, and never lists
it as input. The run record keeps interpolations unresolved, masks secret-looking values and
redacts URIs.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from groundmill import __version__
from groundmill.pipeline.config import MASK, Config, ConfigError, mask_override, recorded_config
from groundmill.pipeline.derive import Derivation, check_parent, derived_items, plan_derivation
from groundmill.pipeline.retry import is_transient, withdraw_transient_errors
from groundmill.pipeline.sources import list_sources, redact_uri
from groundmill.shards import clean_uncommitted, forget_shard, lost_shards, read_index

log = logging.getLogger("groundmill")

RUN_RECORD = "run.json"
MARKER = ".groundmill"  # written into an output directory when a run first claims it
LOCK = ".lock"  # flock'ed by the run writing the directory; holds who that is
_PACKAGES = (
    "torch", "torchvision", "transformers", "ray", "open-clip-torch", "sam2", "spacy",
    "webdataset", "pyarrow", "omegaconf", "pycocotools", "av", "pillow", "numpy",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"groundmill": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stage_provenance(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per enabled stage: its class, model, whether the weights are random, prompt hashes."""
    from groundmill.pipeline.graph import build_stage

    info = {}
    for name, stage_cfg in cfg.stages.items():
        if stage_cfg.enabled:
            stage = build_stage(name, stage_cfg, cfg.run.seed)
            info[name] = {"type": stage_cfg.type or name, **stage.provenance()}
    return info


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def annotation_settings(record: dict[str, Any]) -> dict[str, Any]:
    """What decides a run record's annotations, flattened: seed, limits, video sampling, each stage's
    type, models and params, and the stages' provenance (prompt hashes, thresholds). Not inputs,
    output, Ray, resources or groups, which change how fast, not what."""
    cfg = record["config"]
    stages = {
        name: {k: v for k, v in stage.items() if k not in ("resources", "group")}
        for name, stage in cfg["stages"].items()
    }
    settings = {
        "run.seed": cfg["run"]["seed"],
        "limits": cfg["limits"],
        "video": cfg["video"],
        "output.image_format": cfg["output"].get("image_format", "jpg"),  # the stored pixels
        "stages": stages,
    }
    return _flatten({**settings, "provenance": record["stages"]})


def settings_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose annotation settings differ between two run records. A masked value cannot be
    compared (and outputs written before token counts were unmasked hold `***` for them)."""
    before, after = annotation_settings(previous), annotation_settings(current)
    return sorted(
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and MASK not in (before.get(k), after.get(k))
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# Ray node settings for a streaming run. The raylet kills an idle worker after 1 s once a node has
# more workers than CPUs, which fractional-CPU load and write tasks beside model actors always
# exceed: it then restarts them, ~1-2 CPU-seconds of imports each. On loopback nodes of one CPU that
# churn took a third of the CPU and held 2 nodes to 1.2x one (benchmarks/SCALING.md); kept a minute
# idle, they stay for the next batch. init_ray sets these for its local Ray; `ray start` needs them
# in its environment (README, "Running on a cluster").
RAY_NODE_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
DRIVER_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = DRIVER_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas in this process, as MALLOC_ARENA_MAX does, unless that is set.

    Why: the driver's many Ray threads each get an arena of their own, and memory freed in one is
    not reused by another, so its RSS grew ~6 MB per 1k inputs with the Python heap flat; capped,
    0.5 MB (benchmarks/SCALING.md). Returns whether the cap was set (False off glibc)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def init_ray(cfg: Config) -> None:
    import ray

    limit_malloc_arenas()  # before ray.init starts the driver's threads
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Many model actors start at once on few cores: give slow workers time to register.
        os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")
        for key, value in RAY_NODE_ENV.items():
            os.environ.setdefault(key, value)
        # Many model actors share few cores: idle OpenMP threads must sleep, not spin.
        env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": env},
        )


class OutputError(ConfigError):
    """The output directory cannot be used: not groundmill's, in use, or inconsistent."""


def claim_output(out: Path) -> None:
    """Refuse a non-empty directory that groundmill did not create; mark a new or empty one as ours."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if marker.exists():
        return
    if any(out.iterdir()):
        raise OutputError(
            f"{out} is not empty and holds no {MARKER} marker, so groundmill did not write it; a run would "
            "delete what it does not recognise there: choose a new or empty --output"
        )
    marker.write_text(json.dumps({"created_by": "groundmill", "version": __version__}) + "\n")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on OUT/.lock, or fail naming the run that holds it."""
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputError(
                f"{out} is being written by another run ({holder}); wait for it to end"
            ) from None
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.now(UTC).isoformat()}\n")
            f.flush()
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def redo_lost_shards(out: Path) -> None:
    """Withdraw commits whose tar went missing or was truncated, so their inputs are redone."""
    for name in lost_shards(out):
        log.warning("shard %s is missing or truncated: its inputs will be annotated again", name)
        forget_shard(out, name)


def new_record(
    cfg: Config, num_inputs: int, previous: dict[str, Any], substitutions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """This attempt's run record: config, stage provenance, versions, the attempts so far, and what
    `--cpu` substituted in the manifest (`config.apply_cpu`); no secrets (interpolations as written,
    secret-looking values masked, URIs redacted)."""
    config = recorded_config(cfg)
    config["inputs"] = [redact_uri(u) for u in config["inputs"]]
    record: dict[str, Any] = {
        "groundmill_version": __version__,
        "config": config,
        "stages": stage_provenance(cfg),
        "versions": package_versions(),
        "command": [redact_uri(mask_override(a)) for a in sys.argv],
        "inputs": num_inputs,
        "attempts": previous.get("attempts", []),
    }
    record["random_weight_models"] = [n for n, s in record["stages"].items() if s.get("random_weights")]
    record["substitutions"] = substitutions or []
    return record


def refuse_changed_settings(out: Path, previous: dict[str, Any], record: dict[str, Any]) -> None:
    """One output never mixes two configurations: a resume with other annotation settings fails."""
    changes = settings_changes(previous, record)
    if changes:
        shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(
            f"{out} holds samples annotated with other settings (changed: {shown}); resuming would mix "
            f"the two in one dataset: write to a new --output, or delete {out} to start over"
        )


def annotate(
    cfg: Config, out: Path, pending: list[dict[str, Any]], index: Any, attempt_number: int,
    derivation: Derivation | None = None,
) -> dict[str, float]:  # fmt: skip
    """Start (or join) Ray and stream the pending inputs ({uri, failure} items) through the graph
    into the shard sink, then a derived run's rows of its parent through the rerun stages; returns the
    cluster's CPUs and GPUs (the planner reads where timings were measured)."""
    import ray

    from groundmill.pipeline.derive import build_derived_dataset
    from groundmill.pipeline.graph import build_dataset, check_resources, start_pools, stop_pools
    from groundmill.pipeline.load import KeyRegistry
    from groundmill.pipeline.sink import ShardSink

    init_ray(cfg)
    cluster = {kind: float(ray.cluster_resources().get(kind, 0.0)) for kind in ("CPU", "GPU")}
    try:
        check_resources(cfg, cluster)
    except ConfigError as e:
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            raise
        log.warning("%s; continuing, as an existing cluster may autoscale", e)
    ray.data.DataContext.get_current().max_errored_blocks = cfg.ray.max_errored_blocks
    committed = _committed_keys(index)
    if derivation is not None:  # the parent's samples are this output's too: no input may repeat one
        committed = _committed_keys(read_index(derivation.old_dir, ["key", "uri", "shard"])) | committed
    registry = KeyRegistry.remote(committed)
    step = cfg.run.inputs_per_dataset
    # Several Datasets share long-lived model actors: each Dataset would otherwise load every model again.
    pools = start_pools(cfg, cluster) if len(pending) > step else None
    work = [(pending, lambda items, prefix: build_dataset(cfg, items, registry, pools, prefix))]
    if derivation is not None:  # its rerun stages are a config of their own, with actors of their own
        work.append((derivation.items, lambda items, prefix: build_derived_dataset(cfg, items, derivation)))
    n = 0
    try:
        for items, build in work:
            for i in range(0, len(items), step):  # bounded driver memory (inputs_per_dataset)
                # Shard names carry no config value: attempt, Dataset and (in the sink) write task numbers.
                prefix = f"{attempt_number:03d}-{n:03d}"
                sink = ShardSink(
                    str(out), cfg.output.shard_max_samples, cfg.output.shard_max_mb * 2**20, prefix
                )
                # Write tasks reserve what a load task does (light, I/O-bound) instead of Ray's 1 CPU,
                # which no node with a model actor on its only core could ever give.
                ds = build(items[i : i + step], prefix)
                ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.load.num_cpus})
                n += 1
    finally:
        if pools:
            stop_pools(pools)
    return cluster


def _committed_keys(index: Any) -> dict[str, str]:
    columns = (index.column(c).to_pylist() for c in ("key", "uri", "shard"))
    return {k: u for k, u, s in zip(*columns, strict=True) if s}


def run_pipeline(
    cfg: Config,
    substitutions: list[dict[str, Any]] | None = None,
    parent: str | Path | None = None,
    retry_errors: bool = False,
) -> dict[str, Any]:
    """Annotate every pending input of `cfg` (`substitutions`: what `--cpu` changed, for the run
    record), or with `parent` derive the output from that one (pipeline/derive.py); `retry_errors`
    re-attempts the error rows of transient failures (pipeline/retry.py). Returns the run record."""
    out = Path(cfg.output.dir)
    claim_output(out)
    with output_lock(out):
        return _run_locked(cfg, out, substitutions, Path(parent) if parent else None, retry_errors)


def _pending(cfg: Config, out: Path, done: set[str]) -> tuple[list[dict[str, Any]], int]:
    """The inputs not yet in the index as {uri, failure} items (failure: refused while listing), and
    how many inputs there are in all."""
    listing = list_sources(cfg.inputs, exclude=[out], follow_links=cfg.load.follow_links)
    if listing.skipped:
        log.warning("skipped %d input(s) inside the output directory %s", listing.skipped, out)
    pending = [{"uri": u, "failure": None} for u in listing.uris if redact_uri(u) not in done]
    pending += [{"uri": u, "failure": r} for u, r in listing.failures.items() if u not in done]
    return pending, len(listing.uris) + len(listing.failures)


def _derivation(
    cfg: Config, out: Path, parent: Path, record: dict[str, Any], done: set[str], retry_errors: bool
) -> tuple[Derivation, list[dict[str, Any]]]:
    """A derived run's plan (recorded in `record`) and rows to carry, and the parent's transient
    error rows to annotate afresh when `retry_errors`."""
    plan = plan_derivation(check_parent(parent, out), record)
    record.update(plan.as_record(str(parent)))
    items = derived_items(parent, done)
    retried = [{"uri": r["uri"], "failure": None} for r in items if retry_errors and is_transient(r)]
    items = [r for r in items if not (retry_errors and is_transient(r))]
    log.info("derived from %s: rerun %s, reused %s", parent, plan.rerun or "none", plan.reused or "none")
    return Derivation(parent, plan, items), retried


def refuse_other_parent(out: Path, previous: dict[str, Any], parent: Path | None) -> None:
    """A derived output resumes only from the same parent (and a plain one never becomes derived)."""
    before = previous.get("parent")
    if before != (str(parent) if parent else None):
        was = f"derived from {before}" if before else "not derived"
        raise ConfigError(f"{out} was {was}: resume it with the same --from, or write to a new --output")


def _work(
    cfg: Config, out: Path, parent: Path | None, previous: dict[str, Any], substitutions: Any, done: set[str],
    retry_errors: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]], Derivation | None]:  # fmt: skip
    """This attempt's run record, the inputs to annotate, and a derived run's rows of its parent."""
    if parent is None:
        pending, num_inputs = _pending(cfg, out, done)
        return new_record(cfg, num_inputs, previous, substitutions), pending, None
    # The parent's rows are the inputs: the manifest's `inputs` are not listed.
    record = new_record(cfg, len(read_index(parent, ["uri"])), previous, substitutions)
    derivation, pending = _derivation(cfg, out, parent, record, done, retry_errors)
    return record, pending, derivation


def _run_locked(
    cfg: Config,
    out: Path,
    substitutions: list[dict[str, Any]] | None,
    parent: Path | None,
    retry_errors: bool,
) -> dict[str, Any]:
    removed = clean_uncommitted(out)
    if removed:
        log.info("removed %d uncommitted file(s) left by an interrupted run", len(removed))
    redo_lost_shards(out)
    index = read_index(out, columns=["uri", "key", "shard"])
    record_path = out / RUN_RECORD
    if len(index) and not record_path.exists():
        raise OutputError(
            f"{out} holds committed shards but no {RUN_RECORD}, so the settings that wrote them cannot be "
            f"checked: restore {RUN_RECORD}, or write to a new --output"
        )
    done = set(index.column("uri").to_pylist())
    previous = json.loads(record_path.read_text()) if record_path.exists() else {}
    record, pending, derivation = _work(cfg, out, parent, previous, substitutions, done, retry_errors)
    if previous and done:
        refuse_changed_settings(out, previous, record)
        refuse_other_parent(out, previous, parent)
    if retry_errors and withdraw_transient_errors(out):  # only once the settings are known to match
        index = read_index(out, columns=["uri", "key", "shard"])
        done = set(index.column("uri").to_pylist())
        record, pending, derivation = _work(cfg, out, parent, previous, substitutions, done, retry_errors)
    todo = len(pending) + (len(derivation.items) if derivation else 0)
    attempt = {"started": datetime.now(UTC).isoformat(), "pending": todo, "already_done": len(done)}
    record["attempts"].append(attempt)
    record["status"] = "running"
    _write_json(record_path, record)
    if record["random_weight_models"]:
        log.warning(
            "stages %s use RANDOM weights: their annotations are not real (see run.json)",
            ", ".join(record["random_weight_models"]),
        )
    if pending or (derivation and derivation.items):
        start = time.perf_counter()
        attempt["cluster"] = annotate(cfg, out, pending, index, len(record["attempts"]), derivation)
        attempt["seconds"] = round(time.perf_counter() - start, 3)
    else:
        log.info("nothing to do: all %d inputs are already in %s", record["inputs"], out)
    from groundmill.pipeline.sink import settle_duplicates

    settle_duplicates(out)  # also after a killed run: duplicates of inputs that failed are errors too
    # Writers of a killed earlier run (an orphaned Ray worker) can outlive the start-up clean-up: a
    # finished run leaves no uncommitted file behind, whoever wrote it.
    clean_uncommitted(out)
    attempt["finished"] = datetime.now(UTC).isoformat()
    record["status"] = "complete"
    _write_json(record_path, record)
    return record
