"""Trust, end to end through real Ray: one folder holding many hostile inputs at once, with the
output inside it and a secret in the manifest. The good files are annotated, each bad one is an
error row with its code, nothing outside the folder is read, no secret reaches a file, and a rerun
after a shard is deleted by hand redoes it without ingesting the output (issue 16, findings 2, 3,
5, 6, 7, 8, 9)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groundmill.pipeline.config import load_config
from groundmill.pipeline.report import write_report
from groundmill.pipeline.run import run_pipeline
from groundmill.schema import content_key
from groundmill.shards import read_index
from groundmill.tests.fault_doubles import assert_exactly_once
from groundmill.tests.media_factory import decompression_bomb_png, rgb_jpeg, write_tar

pytestmark = pytest.mark.slow
SECRET = "hunter2-SeCrEt"
S3_ATTACK = f"s3://AKIAKEY:{SECRET}@bucket/x.jpg?endpoint_override=127.0.0.1:9&scheme=http"


def _hostile_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The input folder; returns {name relative to it: expected status or [error code]}."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.jpg").write_bytes(rgb_jpeg(99))
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"good{i}.jpg").write_bytes(rgb_jpeg(i + 1))
    (root / "corrupt.tar").write_bytes(b"not a tar at all" * 64)
    whole = write_tar(
        tmp_path / "whole.tar", [("m0.jpg", rgb_jpeg(10)), ("m1.jpg", rgb_jpeg(11))]
    ).read_bytes()
    (root / "truncated.tar").write_bytes(whole[:700])
    write_tar(root / "traversal.tar", [("inner.jpg", rgb_jpeg(12)), ("../escape.jpg", rgb_jpeg(13))])
    (root / "metadata.jsonl").write_text('{"caption": "a dog"\n')
    pq.write_table(pa.table({"path": ["good0.jpg"]}), root / "no_uri.parquet")
    (root / "list.jsonl").write_text(json.dumps(str(private / "secret.jpg")) + "\n")
    (root / "notes.txt").write_text("not an image")
    (root / "bomb.png").write_bytes(decompression_bomb_png())
    (root / "concat.mp4").write_bytes(b"ffconcat version 1.0\nfile good0.jpg\n")
    os.mkfifo(root / "pipe.jpg")
    (root / "escape.jpg").symlink_to(private / "secret.jpg")
    (root / "loop").symlink_to(root)
    expected = {f"good{i}.jpg": "ok" for i in range(3)} | {
        "traversal.tar#inner.jpg": "ok",
        "corrupt.tar": "[corrupt]",
        "truncated.tar": "[corrupt]",
        "traversal.tar#../escape.jpg": "[unsafe_path]",
        "metadata.jsonl": "[unsupported_format]",
        "no_uri.parquet": "[unsupported_format]",
        "list.jsonl": "[unsupported_format]",
        "notes.txt": "[unsupported_format]",
        "bomb.png": "[bomb]",
        "concat.mp4": "[unsupported_format]",
    }
    return root, expected


def _outcome(row: dict) -> str:
    return "ok" if row["status"] == "ok" else row["error"].removeprefix("load: ").split("]")[0] + "]"


def test_hostile_inputs_are_isolated_confined_and_secret_free(tmp_path, ray_local, monkeypatch):
    root, expected = _hostile_folder(tmp_path)
    uri_list = tmp_path / "uris.jsonl"
    uri_list.write_text(json.dumps(S3_ATTACK) + "\n" + json.dumps("http://127.0.0.1:9/x.jpg") + "\n")
    monkeypatch.setenv("GM_SECRET", SECRET)
    out = root / "out"  # inside the input folder: it must never be listed
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "run: {name: '${oc.env:GM_SECRET}'}\n"
        f"inputs: [{root}, {uri_list}]\n"
        f"output: {{dir: {out}, shard_max_samples: 1}}\n"
        "load: {batch_size: 4}\nray: {num_cpus: 2}\nstages: {}\n"
    )
    run_pipeline(load_config(manifest))

    rows = read_index(out).to_pylist()
    by_name = {r["uri"].replace(f"{root}/", ""): r for r in rows}
    assert {n: _outcome(r) for n, r in by_name.items() if "://" not in n} == expected
    remote = {r["uri"]: _outcome(r) for r in rows if "://" in r["uri"]}
    assert remote == {
        "s3://***@bucket/x.jpg?endpoint_override=127.0.0.1:9&scheme=http": "[unsafe_uri]",
        "http://127.0.0.1:9/x.jpg": "[unsafe_uri]",
    }
    assert content_key(rgb_jpeg(99)) not in {r["key"] for r in rows}  # the file outside was never read
    write_report(out)
    for path in out.rglob("*"):
        assert SECRET not in path.name and "hunter2" not in path.name
        if path.is_file() and path.suffix in (".json", ".parquet", ".html", ".tar"):
            assert SECRET.encode() not in path.read_bytes(), path

    # A shard deleted by hand is redone on rerun; the output's own files are never ingested.
    uris = [r["uri"] for r in rows]
    victim = next(r for r in rows if r["status"] == "ok" and r["shard"])
    (out / victim["shard"]).unlink()
    run_pipeline(load_config(manifest))
    rows = assert_exactly_once(out, uris)
    redone = next(r for r in rows if r["uri"] == victim["uri"])
    assert redone["status"] == "ok" and (out / redone["shard"]).is_file()
    assert not [r for r in rows if "/out/" in r["uri"]]
