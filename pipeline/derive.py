"""Derived outputs: `groundmill run MANIFEST --from OLD --output NEW` builds NEW from OLD's records,
rerunning only the stages whose settings changed.

Each enabled stage has a settings hash (`stage_hashes`): its type, model id, revision and dtype,
params, provenance (prompt hashes, thresholds), the run seed, and the hashes of the stages that write
the fields it `requires` or `uses`, so a change reaches everything downstream of it. A stage rerun
rewrites whole top-level record fields: every other writer of such a field (e.g. `objects`, written by
voting and extended by depth and attributes) reruns with it, as does every writer of a field a removed
stage wrote into. The rest is reused: its fields are carried over from OLD's records unchanged.

A derived run reads OLD's shards, not the original inputs: its rows are OLD's index rows, the stored
media bytes go through unchanged, images are decoded only when a rerun stage reads their pixels
(lazily, as in any run) and video keyframes only when one of the rerun stages `uses_pixels`. OLD's
error and duplicate rows are carried as they are (`--retry-errors` re-reads the transient ones from
their URIs through every stage). NEW is an ordinary output: resume and exactly-once hold as for any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from groundmill.pipeline.config import Config, ConfigError, LimitsConfig, VideoConfig
from groundmill.schema import STATUS_ERROR, STATUS_OK, frame_records
from groundmill.shards import iter_shard, read_index
from groundmill.stages import stage_class
from groundmill.stages.base import ROW_SCHEMA, STATUS_DUPLICATE, Sample

PARENT_KEYS = ("parent", "rerun_stages", "reused_stages", "removed_stages")


def _top(field: str) -> str:
    return field.split(".", 1)[0]


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_settings(record: dict[str, Any]) -> dict[str, Any]:
    """What decides the stored media and the loader's fields: a derived run cannot change these."""
    cfg = record["config"]
    return {
        "limits": cfg["limits"],
        "video": cfg["video"],
        "image_format": cfg["output"].get("image_format", "jpg"),
    }


def _enabled(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in record["config"]["stages"].items() if s.get("enabled", True)}


def _class(name: str, stage: dict[str, Any]) -> type:
    return stage_class(stage.get("type") or name)


def stage_dependencies(record: dict[str, Any]) -> dict[str, list[str]]:
    """Per enabled stage: the earlier stages writing a top-level field it requires or uses."""
    writers: dict[str, list[str]] = defaultdict(list)
    deps = {}
    for name, stage in _enabled(record).items():
        cls = _class(name, stage)
        deps[name] = sorted({w for f in (*cls.requires, *cls.uses) for w in writers[_top(f)]})
        for f in cls.provides:
            writers[_top(f)].append(name)
    return deps


def stage_hashes(record: dict[str, Any]) -> dict[str, str]:
    """Per enabled stage of a run record: its settings hash (module docstring)."""
    seed, provenance = record["config"]["run"]["seed"], record["stages"]
    load = _digest(load_settings(record))
    hashes: dict[str, str] = {}
    for name, deps in stage_dependencies(record).items():
        stage = record["config"]["stages"][name]
        model = {k: stage["model"].get(k) for k in ("id", "revision", "dtype")}  # not device: speed only
        own = {"type": stage.get("type") or name, "model": model, "params": stage["params"], "seed": seed,
               "provenance": provenance.get(name, {})}  # fmt: skip
        hashes[name] = _digest({"own": own, "deps": [hashes[d] for d in deps], "load": load})
    return hashes


@dataclass
class DerivePlan:
    rerun: list[str]  # in pipeline order
    reused: list[str]
    removed: list[str]  # stages of OLD that NEW lacks (or disables)
    reset_fields: set[str]  # top-level record fields dropped from OLD's records before the rerun
    reset_names: set[str]  # stage ids and class names whose bookkeeping (provenance, drops, stats) goes

    def as_record(self, parent: str) -> dict[str, Any]:
        return {"parent": parent, "rerun_stages": self.rerun, "reused_stages": self.reused,
                "removed_stages": self.removed}  # fmt: skip


def _provides(record: dict[str, Any], names: set[str]) -> set[str]:
    stages = record["config"]["stages"]
    return {_top(f) for n in names if n in stages for f in _class(n, stages[n]).provides}


def plan_derivation(old: dict[str, Any], new: dict[str, Any]) -> DerivePlan:
    """Which stages of NEW rerun and which are reused from OLD (run records, as run.json holds them)."""
    if load_settings(old) != load_settings(new):
        raise ConfigError(
            "--from: limits, video sampling and output.image_format decide the stored media, which a "
            "derived run reuses: keep OLD's, or write a fresh output without --from"
        )
    old_hashes, new_hashes = stage_hashes(old), stage_hashes(new)
    deps = stage_dependencies(new)
    removed = [n for n in old_hashes if n not in new_hashes]
    rerun = {n for n, h in new_hashes.items() if old_hashes.get(n) != h}
    while True:
        reset = _provides(old, rerun | set(removed)) | _provides(new, rerun)
        more = {
            n for n in new_hashes if n not in rerun
            and (_provides(new, {n}) & reset or set(deps[n]) & rerun)
        }  # fmt: skip
        if not more:
            break
        rerun |= more
    names = set(rerun) | set(removed)
    classes = {
        _class(n, r["config"]["stages"][n]).name
        for r in (old, new)
        for n in names
        if n in r["config"]["stages"]
    }
    return DerivePlan(
        rerun=[n for n in new_hashes if n in rerun],
        reused=[n for n in new_hashes if n not in rerun],
        removed=removed,
        reset_fields=reset,
        reset_names=names | classes,
    )


def check_parent(old_dir: Path, new_dir: Path) -> dict[str, Any]:
    """OLD's run record; OLD must be a finished groundmill output other than NEW."""
    from groundmill.pipeline.run import RUN_RECORD

    if old_dir.resolve() == new_dir.resolve():
        raise ConfigError(f"--from {old_dir}: a derived output must be a new directory, not its parent")
    path = old_dir / RUN_RECORD
    if not path.is_file():
        raise ConfigError(f"--from {old_dir}: no {RUN_RECORD}, so it is not a groundmill output")
    record = json.loads(path.read_text())
    if record.get("status") != "complete":
        raise ConfigError(
            f"--from {old_dir}: its run has not finished (status {record.get('status')!r}): rerun it first"
        )
    return record


def derived_config(cfg: Config, plan: DerivePlan) -> Config:
    """`cfg` with only the rerun stages enabled: the graph the derived samples go through."""
    stages = {n: dataclasses.replace(s, enabled=n in plan.rerun) for n, s in cfg.stages.items()}
    return dataclasses.replace(cfg, stages=stages)


def reset_record(record: dict[str, Any], plan: DerivePlan) -> dict[str, Any]:
    """OLD's record without what the rerun and removed stages wrote; everything else untouched."""
    for frame in [record, *(frame_records(record) if record["media"]["type"] == "video" else [])]:
        for key in plan.reset_fields:
            frame.pop(key, None)
        if "generations" in frame:
            frame["generations"] = {
                k: v for k, v in frame["generations"].items() if k not in plan.reset_names
            }
        if "llm_drops" in frame:
            frame["llm_drops"] = [d for d in frame["llm_drops"] if d.get("stage") not in plan.reset_names]
            if not frame["llm_drops"]:
                del frame["llm_drops"]
    provenance = record.get("provenance", {})
    record["provenance"] = {k: v for k, v in provenance.items() if k not in plan.reset_names}
    return record


def reused_stats(stats: list[dict[str, Any]] | None, plan: DerivePlan) -> dict[str, float]:
    """OLD's per-sample stats of the reused stages (`<stage>.<name>`; per-actor figures of OLD go)."""
    return {
        s["name"]: s["value"]
        for s in stats or []
        if _top(s["name"]) not in plan.reset_names and not s["name"].startswith("gpu_peak_mib.")
    }


def _carried_row(row: dict[str, Any]) -> Sample:
    """An error or duplicate row of OLD, as the sink writes it again (no sample in the shards)."""
    media = {"type": row["media_type"] or "image", "width": row["width"], "height": row["height"]}
    status = STATUS_ERROR if row["status"] == STATUS_ERROR else STATUS_DUPLICATE
    record = {"source": {"bytes": row["bytes"]}, "media": media} if row["bytes"] is not None else {}
    return Sample(uri=row["uri"], key=row["key"], media_type=row["media_type"] or "", data=b"", frames=[],
                  record=record, status=status, error=row["error"] or "", duplicate_of=row["duplicate_of"])  # fmt: skip


def derived_load_batch(
    batch: pa.Table, old_dir: str, plan: DerivePlan, limits: LimitsConfig, video: VideoConfig, pixels: bool
) -> pa.Table:
    """Ray map_batches function: OLD's index rows -> ROW_SCHEMA rows of OLD's stored samples, their
    records reset for the rerun stages (`pixels`: decode video keyframes for them)."""
    from groundmill.pipeline.load import normalise_input

    rows = batch.to_pylist()
    wanted = defaultdict(set)
    for r in rows:
        if r["status"] == STATUS_OK and r["shard"]:
            wanted[r["shard"]].add(r["key"])
    stored = {}
    for shard, keys in wanted.items():
        for key, files in iter_shard(Path(old_dir) / shard):
            if key in keys:
                stored[key] = files
    out = []
    for r in rows:
        if not (r["status"] == STATUS_OK and r["shard"]):
            out.append(_carried_row(r))
            continue
        files = stored[r["key"]]
        record = reset_record(json.loads(files["json"]), plan)
        ext = record["media"]["ext"]
        frames: list[bytes] = []
        if record["media"]["type"] == "video":
            # Without pixel stages the keyframes stay unread: empty placeholders keep views aligned.
            frames = [b""] * len(record.get("keyframes", []))
            if pixels:
                frames = normalise_input(r["uri"], r["key"], files[ext], limits, video).frames
        sample = Sample(uri=r["uri"], key=r["key"], media_type=record["media"]["type"], data=files[ext],
                        frames=frames, record=record, stats=reused_stats(json.loads(r["stats"]), plan))  # fmt: skip
        out.append(sample)
    return pa.Table.from_pylist([s.to_row() for s in out], schema=ROW_SCHEMA)


@dataclass
class Derivation:
    """A derived run's parent, plan, and OLD's rows still to carry into NEW."""

    old_dir: Path
    plan: DerivePlan
    items: list[dict[str, Any]]


_ITEM_KEYS = ("uri", "key", "shard", "status", "error", "duplicate_of", "media_type", "bytes", "width",
              "height", "stats")  # fmt: skip


def derived_items(old_dir: Path, done: set[str]) -> list[dict[str, Any]]:
    """OLD's index rows not yet in NEW, ordered by shard so a load batch opens few tars."""
    rows = [r for r in read_index(old_dir).to_pylist() if r["uri"] not in done]
    items = [{**{k: r[k] for k in _ITEM_KEYS}, "stats": json.dumps(r["stats"] or [])} for r in rows]
    return sorted(items, key=lambda r: (r["shard"] or "", r["uri"]))


def build_derived_dataset(cfg: Config, items: list[dict[str, Any]], derivation: Derivation) -> Any:
    """The lazy Ray Data graph of a derived run: OLD's samples -> the rerun stages."""
    import ray

    from groundmill.pipeline.graph import add_stages

    rerun = derived_config(cfg, derivation.plan)
    pixels = any(stage_class(s.type or n).uses_pixels for n, s in rerun.stages.items() if s.enabled)
    batch_size = cfg.load.batch_size
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    ds = ds.map_batches(
        derived_load_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={
            "old_dir": str(derivation.old_dir),
            "plan": derivation.plan,
            "limits": cfg.limits,
            "video": cfg.video,
            "pixels": pixels,
        },  # fmt: skip
        num_cpus=cfg.load.num_cpus,
    )
    return add_stages(ds, rerun)
