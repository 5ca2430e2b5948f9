"""End to end through real Ray: every input gets exactly one index row, bad inputs become error rows,
duplicates are annotated once, and reruns finish a killed run without loss or duplication."""

import copy
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from groundmill.pipeline.config import ConfigError, load_config
from groundmill.pipeline.inspect import summarize
from groundmill.pipeline.run import RUN_RECORD, run_pipeline
from groundmill.schema import check_record
from groundmill.shards import INDEX_DIR, SHARDS_DIR, read_index
from groundmill.tests.media_factory import rgb_jpeg, write_inputs

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, inputs: Path, out: Path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"inputs: [{inputs}]\n"
        f"output: {{dir: {out}, shard_max_samples: 4}}\n"
        "stages:\n  tagging:\n    model: {id: tiny}\n    resources: {batch_size: 4}\n    params: {top_k: 3}\n"
    )
    return load_config(manifest)


def _read_tars(out: Path) -> list[dict]:
    tars = sorted(str(p) for p in (out / SHARDS_DIR).glob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False)) if tars else []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("run")
    expected = write_inputs(tmp / "inputs")
    cfg = _config(tmp, tmp / "inputs", tmp / "out")
    run_pipeline(cfg)
    return tmp, cfg, expected


def test_every_input_has_exactly_one_row_with_expected_status(finished_run):
    tmp, cfg, expected = finished_run
    rows = read_index(cfg.output.dir).to_pylist()
    by_name = Counter(Path(r["uri"]).name for r in rows)
    assert by_name == Counter(expected.keys())
    for r in rows:
        assert r["status"] == expected[Path(r["uri"]).name], r
        if r["status"] == "error":
            assert r["error"].startswith("load: ") and r["shard"] is None


def test_error_reasons_are_specific(finished_run):
    _, cfg, _ = finished_run
    reasons = {Path(r["uri"]).name: r["error"] for r in read_index(cfg.output.dir).to_pylist() if r["error"]}
    assert "empty file" in reasons["empty.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not a recognised image" in reasons["notes.txt"]
    assert "video" in reasons["broken.mp4"] or "unreadable" in reasons["broken.mp4"]


def test_duplicates_are_annotated_once(finished_run):
    _, cfg, _ = finished_run
    rows = read_index(cfg.output.dir).to_pylist()
    dup = [r for r in rows if r["duplicate_of"]]
    assert len(dup) == 1
    names = {Path(dup[0]["uri"]).name, Path(dup[0]["duplicate_of"]).name}
    assert names == {"good_a.jpg", "copy_of_a.jpg"}
    owner = next(r for r in rows if r["uri"] == dup[0]["duplicate_of"])
    assert owner["key"] == dup[0]["key"] and owner["shard"] is not None and dup[0]["shard"] is None


def test_shards_hold_each_ok_sample_once_with_valid_records(finished_run):
    _, cfg, _ = finished_run
    samples = _read_tars(Path(cfg.output.dir))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys))
    index_keys = {r["key"] for r in read_index(cfg.output.dir).to_pylist() if r["shard"]}
    assert set(keys) == index_keys
    for s in samples:
        record = json.loads(s["json"])
        assert record["key"] == s["__key__"] and record["media"]["ext"] in s
        assert check_record(record) == []
        assert record["provenance"]["tagging"] == {"model": "tiny", "random_weights": True}
        if record["media"]["type"] == "video":
            assert len(record["keyframes"]) == 4 and all("tags" in f for f in record["keyframes"])
        else:
            assert "tags" in record


def test_odd_images_are_normalised(finished_run):
    _, cfg, _ = finished_run
    samples = {
        json.loads(s["json"])["source"]["uri"].rsplit("/", 1)[-1]: json.loads(s["json"])
        for s in _read_tars(Path(cfg.output.dir))
    }
    assert (samples["rotated.jpg"]["media"]["width"], samples["rotated.jpg"]["media"]["height"]) == (64, 96)
    assert "CMYK->RGB" in samples["cmyk.jpg"]["normalisation"]
    assert samples["wide.png"]["media"]["width"] == 4096


def test_inspect_agrees_with_an_independent_read(finished_run):
    _, cfg, expected = finished_run
    summary = summarize(cfg.output.dir)
    samples = _read_tars(Path(cfg.output.dir))
    assert summary["samples"] == len(samples) == len({s["__key__"] for s in samples})
    assert summary["inputs"] == len(expected)
    assert summary["errors"] == sum(1 for v in expected.values() if v == "error")
    assert summary["shards"] == len(list((Path(cfg.output.dir) / SHARDS_DIR).glob("*.tar")))
    assert summary["media_types"] == dict(Counter(json.loads(s["json"])["media"]["type"] for s in samples))
    assert summary["stages"]["tagging"]["samples"] == len(samples)
    assert summary["random_weight_models"] == ["tagging"]


def test_rerun_of_finished_run_does_nothing(finished_run):
    _, cfg, _ = finished_run
    before = sorted(p.name for p in Path(cfg.output.dir).rglob("*") if p.is_file() and p.name != RUN_RECORD)
    record = run_pipeline(cfg)
    assert record["attempts"][-1]["pending"] == 0
    after = sorted(p.name for p in Path(cfg.output.dir).rglob("*") if p.is_file() and p.name != RUN_RECORD)
    assert before == after


def test_rerun_with_other_annotation_settings_is_refused(finished_run):
    """Resuming into an output written with other stage params would mix two datasets in one;
    resources only change speed and are allowed."""
    _, cfg, _ = finished_run
    faster = copy.deepcopy(cfg)
    faster.stages["tagging"].resources.batch_size = 2
    assert run_pipeline(faster)["attempts"][-1]["pending"] == 0
    other = copy.deepcopy(cfg)
    other.stages["tagging"].params = dataclasses.replace(cfg.stages["tagging"].params, top_k=5)
    with pytest.raises(ConfigError, match=r"changed: stages\.tagging\.params\.top_k\)"):
        run_pipeline(other)
    record = json.loads((Path(cfg.output.dir) / RUN_RECORD).read_text())
    assert record["config"]["stages"]["tagging"]["params"]["top_k"] == 3


def test_interrupted_run_is_finished_without_loss_or_duplicates(finished_run, tmp_path):
    src, cfg, expected = finished_run
    out = tmp_path / "out"
    shutil.copytree(cfg.output.dir, out)
    # A killed run: one shard's index part never got written, plus a half-written temp file.
    parts = sorted((out / INDEX_DIR).glob("*.parquet"))
    lost = parts[0]
    lost.unlink()
    (out / SHARDS_DIR / ".partial.tar.abcd.tmp").write_bytes(b"half")
    (src / "inputs" / "late.jpg").write_bytes(rgb_jpeg(7))  # and a new input arrived meanwhile
    try:
        cfg2 = _config(tmp_path, src / "inputs", out)
        run_pipeline(cfg2)
    finally:
        (src / "inputs" / "late.jpg").unlink()
    rows = read_index(out).to_pylist()
    assert Counter(Path(r["uri"]).name for r in rows) == Counter([*expected, "late.jpg"])
    keys = [s["__key__"] for s in _read_tars(out)]
    assert len(keys) == len(set(keys)) == len({r["key"] for r in rows if r["shard"]})
    assert not list((out / SHARDS_DIR).glob("*.tmp")) and not list((out / SHARDS_DIR).glob(".*"))


def test_inputs_split_over_several_datasets_are_each_written_once(finished_run, tmp_path):
    """Ray Data keeps per-block stats on the driver until a Dataset ends, so a run goes through one
    Dataset per `run.inputs_per_dataset` inputs: the same rows as one Dataset, duplicates across
    Datasets still found (the key registry outlives them)."""
    src, cfg, expected = finished_run
    chunked = copy.deepcopy(cfg)
    chunked.output.dir = str(tmp_path / "out")
    chunked.run.inputs_per_dataset = 4
    run_pipeline(chunked)
    rows = read_index(chunked.output.dir).to_pylist()
    assert len(expected) > 2 * chunked.run.inputs_per_dataset
    assert Counter(Path(r["uri"]).name for r in rows) == Counter(expected.keys())
    assert sorted((r["uri"], r["status"], r["key"]) for r in rows) == sorted(
        (r["uri"], r["status"], r["key"]) for r in read_index(cfg.output.dir).to_pylist()
    )
    assert sum(1 for r in rows if r["duplicate_of"]) == 1
