"""Fault injection through real Ray: a stage that raises, a model actor killed mid-run, the driver
killed mid-run, a full disk and a read-only output. The stages that fail on purpose are test doubles
(tests/fault_doubles.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from groundmill.pipeline.cli import main
from groundmill.pipeline.config import load_config
from groundmill.pipeline.run import run_pipeline
from groundmill.shards import INDEX_DIR, SHARDS_DIR, ShardWriter, iter_shard
from groundmill.tests.fault_doubles import assert_exactly_once, kill_mid_run, use_doubles
from groundmill.tests.media_factory import rgb_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture()
def doubles(monkeypatch):
    use_doubles(monkeypatch.setitem)


def _inputs(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.jpg"
        path.write_bytes(rgb_jpeg(seed=i + 1))
        paths.append(str(path))
    return paths


def _manifest(tmp_path: Path, inputs: Path, out: Path, stage: str, params: str, shard: int = 2) -> Path:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"run: {{name: faults}}\ninputs: [{inputs}]\n"
        f"output: {{dir: {out}, shard_max_samples: {shard}}}\n"
        "load: {batch_size: 2}\nray: {num_cpus: 2}\n"
        f"stages:\n  {stage}:\n    resources: {{batch_size: 2}}\n    params: {params}\n"
    )
    return manifest


@pytest.mark.parametrize("stage", ["raise_on_uri", "raise_on_uri_task"])
def test_stage_raising_on_one_sample_makes_one_error_row(tmp_path, ray_local, doubles, stage):
    uris = _inputs(tmp_path / "in", 6)
    cfg = load_config(_manifest(tmp_path, tmp_path / "in", tmp_path / "out", stage, "{marker: img03}"))
    run_pipeline(cfg)
    rows = assert_exactly_once(tmp_path / "out", uris)
    bad = [r for r in rows if r["status"] == "error"]
    assert [Path(r["uri"]).name for r in bad] == ["img03.jpg"]
    assert bad[0]["error"] == f"{stage}: RuntimeError: injected failure on img03.jpg"
    records = [files for tar in (tmp_path / "out" / SHARDS_DIR).glob("*.tar") for _, files in iter_shard(tar)]
    assert len(records) == 5 and all(b'"fault_double":"seen"' in f["json"] for f in records)


def test_killed_model_actor_is_restarted_and_the_run_completes(tmp_path, ray_local, doubles):
    uris = _inputs(tmp_path / "in", 6)
    marker = tmp_path / "crashed"
    cfg = load_config(
        _manifest(tmp_path, tmp_path / "in", tmp_path / "out", "crash_once", f"{{marker: {marker}}}")
    )
    run_pipeline(cfg)
    assert marker.exists(), "the actor never crashed: the test did not test anything"
    rows = assert_exactly_once(tmp_path / "out", uris)
    assert all(r["status"] == "ok" for r in rows)


def test_killed_driver_then_rerun_loses_and_duplicates_nothing(tmp_path, ray_local, doubles):
    uris = _inputs(tmp_path / "in", 16)
    out = tmp_path / "out"
    manifest = _manifest(tmp_path, tmp_path / "in", out, "slow", "{seconds: 0.3}")
    done_before = kill_mid_run("fault_doubles", ["run", str(manifest)], out)
    assert 0 < done_before < len(uris), f"the kill was not mid-run ({done_before} of {len(uris)} done)"

    run_pipeline(load_config(manifest))
    rows = assert_exactly_once(out, uris)
    assert all(r["status"] == "ok" for r in rows)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def _noise_png(path: Path, seed: int, side: int = 300) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # incompressible: ~270 KB each


def test_full_disk_fails_clearly_and_leaves_no_partial_shard(tmp_path, ray_local, doubles):
    (tmp_path / "in").mkdir()
    for i in range(6):
        _noise_png(tmp_path / "in" / f"noise{i}.png", i)
    out = tmp_path / "small_disk"
    _mount_tmpfs(out, "size=1m")
    try:
        # stored as PNG, so the noise stays incompressible (1.6 MB against the 1 MB disk)
        manifest = _manifest(tmp_path, tmp_path / "in", out, "raise_on_uri", "{marker: none}")
        cfg = load_config(manifest, ["output.image_format=png"])
        with pytest.raises(OSError, match="No space left on device"):
            run_pipeline(cfg)
        committed = {p.stem for p in (out / INDEX_DIR).glob("*.parquet")}
        assert {p.stem for p in (out / SHARDS_DIR).glob("*.tar")} <= committed
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        for part in (out / INDEX_DIR).glob("*.parquet"):
            pq.read_table(part)  # every visible index part is whole
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_read_only_output_is_a_clear_cli_error(tmp_path, capsys, doubles):
    _inputs(tmp_path / "in", 2)
    out = tmp_path / "read_only"
    _mount_tmpfs(out, "size=1m,ro")
    try:
        manifest = _manifest(tmp_path, tmp_path / "in", out / "run", "raise_on_uri", "{marker: none}")
        assert main(["run", str(manifest)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("groundmill: error:") and "Read-only file system" in err
        assert "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


@pytest.mark.parametrize("fail_at", ["tar", "index"])
def test_shard_commit_on_a_full_disk_leaves_nothing_visible(tmp_path, monkeypatch, fail_at):
    """The same without a mount: the disk fills while writing the tar, or later while writing its
    index part (the tar must then be withdrawn: a tar without its index part is not committed)."""
    import groundmill.shards as sink

    real_fsync = os.fsync
    writes = {"n": 0}

    def fsync_on_full_disk(fd: int) -> None:
        writes["n"] += 1  # 1st fsync: the tar; 2nd: the index part
        if (fail_at == "tar" and writes["n"] == 1) or (fail_at == "index" and writes["n"] == 2):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(sink.os, "fsync", fsync_on_full_disk)
    writer = ShardWriter(tmp_path, name="full")
    data = rgb_jpeg(seed=3)
    key = "ab" * 12
    writer.add_sample(key, data, "jpg", {"key": key}, {"uri": "x.jpg", "status": "ok"})
    with pytest.raises(OSError, match="No space left on device"):
        writer.commit()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("fault", "reason", "on_failure"),
    [
        ("garbage", "not JSON", "error"),
        ("garbage", "not JSON", "drop"),
        ("slow", "", "drop"),
        ("slow", "timeout", "error"),
    ],
)
def test_llm_endpoint_garbage_or_timeout_is_retried_then_recorded(
    tmp_path, ray_local, doubles, request, fault, reason, on_failure
):
    """A misbehaving OpenAI-compatible endpoint: each prompt is retried `attempts` times, then becomes
    an error row (on_failure=error; coded `llm_output` for garbage, `timeout` for a server that never
    answers, which `--retry-errors` re-attempts), or the drop is recorded in the kept sample (record
    `llm_drops`, index stats); every input gets exactly one row either way."""
    base_url, hits = request.getfixturevalue("fault_server")[:2]
    uris = _inputs(tmp_path / "in", 3)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"inputs: [{tmp_path / 'in'}]\noutput: {{dir: {tmp_path / 'out'}}}\nload: {{batch_size: 3}}\n"
        "stages:\n  hand_built_objects: {}\n  scene_graph: {}\n"
        f"  dense_caption:\n    model: {{id: {fault}}}\n    resources: {{batch_size: 3}}\n"
        f"    params: {{attempts: 2, max_new_tokens: 8, on_failure: {on_failure}, "
        f"llm: {{backend: http, base_url: '{base_url}', timeout_s: 0.5, request_retries: 1}}}}\n"
    )
    before = hits.get(fault, 0)
    run_pipeline(load_config(manifest))
    rows = assert_exactly_once(tmp_path / "out", uris)
    if on_failure == "error":
        assert all(r["status"] == "error" and r["shard"] is None for r in rows)
        code = "llm_output" if fault == "garbage" else "timeout"
        assert all(
            r["error"].startswith(f"dense_caption: [{code}] LLM output failed after 2 attempts") for r in rows
        )
        assert all(reason in r["error"] and r["error_code"] == code for r in rows)
        assert hits[fault] - before == 3 * 2 * (1 if fault == "garbage" else 2)
        return
    assert all(
        r["status"] == "ok" and {x["name"]: x["value"] for x in r["stats"]}["dense_caption.dropped"] == 1.0
        for r in rows
    )
    for tar in (tmp_path / "out" / SHARDS_DIR).glob("*.tar"):
        for _, files in iter_shard(tar):
            record = json.loads(files["json"])
            assert "dense_caption" not in record
            [drop] = record["llm_drops"]
            assert drop["stage"] == "dense_caption" and drop["attempts"] == 2 and reason in drop["reason"]
    # garbage: one request per attempt; a timeout: each attempt also retried once at the transport level.
    assert hits[fault] - before == 3 * 2 * (1 if fault == "garbage" else 2)
