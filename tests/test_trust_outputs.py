"""Trust, outputs: a run writes only where it owns the directory, alone, redoes shards lost since
their commit, never writes a row twice on a retried write task, keeps secrets out of run.json, file
names and the command line it records, and the trainer opens only shard files inside its source
(issue 16, findings 1, 4, 5, 8, 10, 14). These call the run's own checks directly (no Ray); the
end-to-end run is in tests/test_trust_run.py."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data._internal.execution.interfaces import TaskContext

from groundmill.model.records import safe_shard_path, shard_urls
from groundmill.pipeline.config import ConfigError, load_config, mask_override
from groundmill.pipeline.run import (
    MARKER,
    RUN_RECORD,
    OutputError,
    claim_output,
    new_record,
    output_lock,
    redo_lost_shards,
    run_pipeline,
)
from groundmill.pipeline.sink import ShardSink
from groundmill.schema import STATUS_ERROR, content_key
from groundmill.shards import INDEX_DIR, SHARDS_DIR, ShardWriter, index_table, lost_shards, read_index
from groundmill.stages.base import ROW_SCHEMA, Sample
from groundmill.tests.media_factory import rgb_jpeg


def _manifest(tmp_path: Path, out: Path, extra: str = "") -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "a.jpg").write_bytes(rgb_jpeg(1))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"inputs: [{tmp_path / 'in'}]\noutput: {{dir: {out}}}\n{extra}")
    return manifest


def _commit(out: Path, name: str, n: int) -> list[str]:
    """A committed shard of n image samples; returns their uris."""
    writer = ShardWriter(out, name=name)
    uris = []
    for i in range(n):
        data = rgb_jpeg(seed=hash((name, i)) % 200)
        key = content_key(data + name.encode() + bytes([i]))
        uri = f"/in/{name}-{i}.jpg"
        record = {"key": key, "media": {"type": "image", "ext": "jpg"}}
        writer.add_sample(key, data, "jpg", record, {"uri": uri, "status": "ok"})
        uris.append(uri)
    writer.commit()
    return uris


def test_an_output_groundmill_did_not_write_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    (out / SHARDS_DIR).mkdir(parents=True)
    (out / SHARDS_DIR / "other.tar").write_bytes(b"someone else's data")
    with pytest.raises(OutputError, match="not empty and holds no .groundmill marker"):
        run_pipeline(load_config(_manifest(tmp_path, out)))
    assert (out / SHARDS_DIR / "other.tar").read_bytes() == b"someone else's data"
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_output(empty)  # an empty (or new) directory becomes ours
    assert json.loads((empty / MARKER).read_text())["created_by"] == "groundmill"
    (empty / "later.txt").write_text("x")
    claim_output(empty)  # and stays ours


def test_a_second_run_on_one_output_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(_manifest(tmp_path, out))
    claim_output(out)
    holder = f"being written by another run \\(pid {os.getpid()} on "
    with output_lock(out), pytest.raises(OutputError, match=holder):
        run_pipeline(cfg)
    with output_lock(out):  # released: the next run gets it
        pass


def test_committed_shards_without_run_json_are_refused(tmp_path):
    out = tmp_path / "out"
    claim_output(out)
    _commit(out, "001-000-00000-aaaa", 2)
    with pytest.raises(OutputError, match=f"no {RUN_RECORD}"):
        run_pipeline(load_config(_manifest(tmp_path, out)))


def test_shards_lost_since_their_commit_are_redone(tmp_path):
    out = tmp_path / "out"
    kept = _commit(out, "kept", 2)
    _commit(out, "deleted", 2)
    _commit(out, "truncated", 3)
    _commit(out, "legacy", 2)
    _commit(out, "legacy_cut", 2)
    (out / SHARDS_DIR / "deleted.tar").unlink()
    with open(out / SHARDS_DIR / "truncated.tar", "r+b") as f:
        f.truncate(1500)
    for name in ("legacy", "legacy_cut"):  # index parts written before the size was recorded
        part = out / INDEX_DIR / f"{name}.parquet"
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    with open(out / SHARDS_DIR / "legacy_cut.tar", "r+b") as f:
        f.truncate(1500)
    errors_only = ShardWriter(out, name="errors")
    errors_only.add_row({"uri": "/in/bad.jpg", "status": STATUS_ERROR, "error": "load: [empty] empty file"})
    errors_only.commit()

    assert lost_shards(out) == ["deleted", "legacy_cut", "truncated"]
    redo_lost_shards(out)
    assert sorted(read_index(out).column("uri").to_pylist()) == sorted(
        [*kept, *[f"/in/legacy-{i}.jpg" for i in range(2)], "/in/bad.jpg"]
    )
    assert sorted(p.name for p in (out / SHARDS_DIR).iterdir()) == ["kept.tar", "legacy.tar"]


def _block(uris: list[str]) -> pa.Table:
    rows = []
    for uri in uris:
        data = rgb_jpeg(seed=int(uri.rsplit("-", 1)[1]) + 1)
        record = {
            "key": content_key(data),
            "media": {"type": "image", "ext": "jpg", "width": 96, "height": 64},
        }
        rows.append(Sample(uri, content_key(data), "image", data, [], record).to_row())
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def test_a_retried_write_task_never_writes_a_row_twice(tmp_path):
    """Ray retries a write task that died after committing its first shard: the retry (same task
    index, same blocks) must skip what that shard holds."""
    uris = [f"/in/img-{i}" for i in range(5)]
    sink = ShardSink(str(tmp_path), max_samples=2, max_bytes=2**30, prefix="001-000")

    def dying_blocks():
        yield _block(uris[:3])  # the first shard (2 rows) commits, then the worker dies
        raise ConnectionError("worker died")

    with pytest.raises(ConnectionError):
        sink.write(dying_blocks(), TaskContext(task_idx=7, op_name="Write"))
    assert len(read_index(tmp_path)) == 2
    sink.write([_block(uris[:3]), _block(uris[3:])], TaskContext(task_idx=7, op_name="Write"))
    assert Counter(read_index(tmp_path).column("uri").to_pylist()) == Counter(uris)
    names = [p.stem for p in (tmp_path / INDEX_DIR).glob("*.parquet")]
    assert all(
        re.fullmatch(r"001-000-00007-((image|video)-[a-z0-9]+|rows)-[0-9a-f]{12}", n) for n in names
    ), names


def test_run_json_keeps_secrets_out(tmp_path, monkeypatch):
    monkeypatch.setenv("GM_SECRET", "hunter2-secret")
    out = tmp_path / "out"
    manifest = _manifest(
        tmp_path,
        out,
        "run: {name: '${oc.env:GM_SECRET}'}\n"
        "stages:\n  tagging:\n    model: {id: tiny, revision: '${oc.env:GM_SECRET}'}\n",
    )
    overrides = ["stages.tagging.params.top_k=3", "run.seed=1"]
    argv = [
        "groundmill",
        "run",
        str(manifest),
        "--input",
        "s3://AK:SK@bucket/x.jpg",
        "llm.api_key=sk-live-123",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cfg = load_config(manifest, overrides)
    assert cfg.run.name == "hunter2-secret"  # resolved for the run itself
    record = new_record(cfg, 1, {})
    text = json.dumps(record)
    assert "hunter2" not in text and "SK@" not in text and "sk-live" not in text
    assert record["config"]["run"]["name"] == "${oc.env:GM_SECRET}"
    assert record["config"]["stages"]["tagging"]["model"]["revision"] == "${oc.env:GM_SECRET}"
    assert record["command"][-2:] == ["s3://***@bucket/x.jpg", "llm.api_key=***"]


def test_secret_override_values_are_masked_in_errors():
    assert mask_override("stages.x.params.llm.api_key=sk-1") == "stages.x.params.llm.api_key=***"
    assert mask_override("output.dir=/data/out") == "output.dir=/data/out"
    assert mask_override("stages.x.params.llm.api_key_env=MY_VAR") == "stages.x.params.llm.api_key_env=MY_VAR"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["inputs=[x]", "run.seed.token=sk-very-secret"])
    assert "sk-very-secret" not in str(e.value)


def _index_with_shard(source: Path, shard: str) -> None:
    (source / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    table = index_table([{"key": "ab" * 12, "uri": "x.jpg", "shard": shard, "status": "ok"}])
    pq.write_table(table, source / INDEX_DIR / "evil.parquet")


@pytest.mark.parametrize(
    "shard",
    [
        "pipe:touch {canary}",
        "/etc/passwd",
        "../outside.tar",
        "shards/../../outside.tar",
        "file:///etc/passwd",
    ],
)
def test_the_trainer_opens_only_shard_files_inside_their_source(tmp_path, monkeypatch, shard):
    canary = tmp_path / "pwned"
    source = tmp_path / "out"
    _index_with_shard(source, shard.format(canary=canary))
    monkeypatch.chdir(source)  # `path: .`: a relative source would put the pipe: URL first
    with pytest.raises(ValueError, match="unsafe shard path"):
        shard_urls(".")
    assert not canary.exists()


def test_shard_paths_that_resolve_outside_through_a_link_are_refused(tmp_path):
    source = tmp_path / "out"
    (source / SHARDS_DIR).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (source / "escape").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside the output"):
        safe_shard_path(source, "escape/x.tar")
    assert safe_shard_path(source, "shards/a.tar") == str((source / SHARDS_DIR / "a.tar").resolve())
