"""Derived outputs (`run --from`) and `--retry-errors` through real Ray, with small test-double stages
(tests/derive_doubles.py), plus the plan of the real demo manifest (which stages a change reruns)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from groundmill.pipeline.config import ConfigError, load_config
from groundmill.pipeline.derive import (
    DerivePlan,
    derived_items,
    derived_load_batch,
    plan_derivation,
    stage_hashes,
)
from groundmill.pipeline.graph import failure_code
from groundmill.pipeline.load import normalise_input
from groundmill.pipeline.run import new_record, run_pipeline, settings_changes
from groundmill.schema import content_key
from groundmill.shards import SHARDS_DIR, ShardWriter, iter_shard, read_index
from groundmill.stages.base import SampleError
from groundmill.stages.llm.base import LLMUnavailable
from groundmill.stages.llm.stage import llm_failure_code
from groundmill.tests.derive_doubles import use_derive_doubles
from groundmill.tests.fault_doubles import assert_exactly_once, kill_mid_run
from groundmill.tests.media_factory import h264, rgb_jpeg

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo.yaml"
THREE = {
    "paint": "resources: {batch_size: 2}",
    "describe": "resources: {batch_size: 2}",
    "stamp": "resources: {batch_size: 2}",
}


@pytest.fixture()
def doubles(monkeypatch):
    use_derive_doubles(monkeypatch.setitem)


def _record(manifest: Path | str, overrides: list[str] | None = None) -> dict:
    cfg = load_config(manifest, ["inputs=[x]", *(overrides or [])])
    return json.loads(json.dumps(new_record(cfg, 0, {}), default=str))  # as run.json holds it


def test_demo_max_new_tokens_of_extra_context_reruns_it_alone():
    plan = plan_derivation(_record(DEMO), _record(DEMO, ["stages.extra_context.params.max_new_tokens=40"]))
    assert plan.rerun == ["extra_context"]
    assert plan.reset_fields == {"additional_context"}
    assert "extra_context" not in plan.reused and len(plan.reused) == len(stage_hashes(_record(DEMO))) - 1


def test_demo_detector_change_reruns_what_reads_its_boxes_and_nothing_else():
    plan = plan_derivation(_record(DEMO), _record(DEMO, ["stages.detect_owlv2.params.max_boxes=5"]))
    # masks rewrites `detections` (so both detectors rerun with it), voting builds `objects` from them,
    # auto_masks keeps what no object covers, stuff numbers its regions after the objects, the
    # verifiers judge them, depth and attributes extend `objects`, and the language stages read them.
    assert plan.rerun == [
        "detect_owlv2", "detect_grounding_dino", "masks", "voting", "auto_masks", "stuff",
        "mask_verification", "exhaustivity", "depth", "attributes", "grounding", "scene_graph",
        "dense_caption", "verification", "refexp", "extra_context", "gcg",
    ]  # fmt: skip
    assert plan.reused == [
        "tagging",
        "landmark",
        "near_duplicates",
        "captions",
        "tracking",
        "video_expressions",
    ]


def test_a_derived_run_cannot_change_the_stored_media():
    with pytest.raises(ConfigError, match="decide the stored media"):
        plan_derivation(_record(DEMO), _record(DEMO, ["limits.max_side=512"]))


def _inputs(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(rgb_jpeg(seed=i + 1))
    return [str(folder / n) for n in names]


def _manifest(path: Path, inputs: Path, out: Path, stages: dict[str, str]) -> Path:
    body = "".join(f"  {name}: {{{spec}}}\n" for name, spec in stages.items())
    path.write_text(
        f"run: {{name: derive}}\ninputs: [{inputs}]\noutput: {{dir: {out}, shard_max_samples: 2}}\n"
        f"load: {{batch_size: 2}}\nray: {{num_cpus: 2}}\nstages:\n{body}"
    )
    return path


def _samples(out: Path) -> dict[str, dict]:
    """key -> {"media": bytes, "record": parsed json, "json": {field: its exact JSON text}}."""
    found = {}
    for tar in (out / SHARDS_DIR).glob("*.tar"):
        for key, files in iter_shard(tar):
            record = json.loads(files["json"])
            fields = {k: json.dumps(v, ensure_ascii=False, separators=(",", ":")) for k, v in record.items()}
            found[key] = {"media": files["jpg"], "record": record, "json": fields}
    return found


def _timed_stages(out: Path) -> set[str]:
    return {t["stage"] for r in read_index(out).to_pylist() for t in r["timings"] or []}


def _derive(manifest: Path, old: Path, new: Path, overrides: list[str] | None = None) -> dict:
    run_pipeline(load_config(manifest, [f"output.dir={new}", *(overrides or [])]), parent=old)
    return json.loads((new / "run.json").read_text())


@pytest.mark.slow
def test_change_add_and_remove_stages_of_a_derived_output(tmp_path, ray_local, doubles):
    uris = _inputs(tmp_path / "in", [f"img{i}.jpg" for i in range(5)])
    old = tmp_path / "old"
    manifest = _manifest(tmp_path / "m.yaml", tmp_path / "in", old, THREE)
    run_pipeline(load_config(manifest))
    before = _samples(old)
    assert len(before) == 5 and all(s["record"]["stamp"] == "first" for s in before.values())

    # One param of an independent stage: it alone reruns; everything else is carried byte for byte.
    new = tmp_path / "stamp2"
    record = _derive(manifest, old, new, ["stages.stamp.params.text=second"])
    assert (record["parent"], record["rerun_stages"], record["reused_stages"]) == (
        str(old),
        ["stamp"],
        ["paint", "describe"],
    )
    after = _samples(new)
    assert after.keys() == before.keys()
    for key, sample in after.items():
        assert sample["media"] == before[key]["media"]
        assert sample["record"]["stamp"] == "second"
        for field in ("paint", "description", "source", "media", "normalisation"):
            assert sample["json"][field] == before[key]["json"][field]
        assert sample["record"]["provenance"].keys() == {"paint", "describe", "stamp"}
    assert _timed_stages(new) == {"stamp"}
    rows = assert_exactly_once(new, uris)
    assert all({s["name"] for s in r["stats"]} == {"paint.calls"} for r in rows)  # carried from OLD

    # A param of the stage others require: it and its dependant rerun, the independent one does not.
    record = _derive(manifest, old, tmp_path / "blue", ["stages.paint.params.colour=blue"])
    assert record["rerun_stages"] == ["paint", "describe"] and record["reused_stages"] == ["stamp"]
    blue = _samples(tmp_path / "blue")
    assert all(s["record"]["description"].startswith("painted blue:") for s in blue.values())
    assert all(blue[k]["json"]["stamp"] == before[k]["json"]["stamp"] for k in blue)

    # A new stage runs alone; a removed stage's fields and provenance are dropped, nothing reruns.
    added = _manifest(tmp_path / "added.yaml", tmp_path / "in", old, {**THREE, "flaky": ""})
    record = _derive(added, old, tmp_path / "added")
    assert record["rerun_stages"] == ["flaky"] and _timed_stages(tmp_path / "added") == {"flaky"}
    assert all(s["record"]["flaky"] == "ok" for s in _samples(tmp_path / "added").values())
    removed = _manifest(tmp_path / "removed.yaml", tmp_path / "in", old, {"paint": "", "describe": ""})
    record = _derive(removed, old, tmp_path / "removed")
    assert (record["rerun_stages"], record["removed_stages"]) == ([], ["stamp"])
    for key, sample in _samples(tmp_path / "removed").items():
        assert "stamp" not in sample["record"] and "stamp" not in sample["record"]["provenance"]
        assert sample["json"]["paint"] == before[key]["json"]["paint"]
    assert _timed_stages(tmp_path / "removed") == set()
    assert_exactly_once(tmp_path / "removed", uris)

    # A derived output resumes only from its parent; rerunning it finished does nothing.
    with pytest.raises(ConfigError, match="derived from"):
        run_pipeline(load_config(manifest, [f"output.dir={new}", "stages.stamp.params.text=second"]))
    _derive(manifest, old, new, ["stages.stamp.params.text=second"])
    assert_exactly_once(new, uris)


@pytest.mark.slow
def test_killed_derived_run_then_rerun_loses_and_duplicates_nothing(tmp_path, ray_local, doubles):
    uris = _inputs(tmp_path / "in", [f"img{i:02d}.jpg" for i in range(16)])
    old, new = tmp_path / "old", tmp_path / "new"
    manifest = _manifest(tmp_path / "m.yaml", tmp_path / "in", old, THREE)
    run_pipeline(load_config(manifest))
    slow = ["stages.paint.params.colour=green", "stages.paint.params.seconds=0.3"]
    args = ["run", str(manifest), "--from", str(old), "--output", str(new), *slow]
    done_before = kill_mid_run("derive_doubles", args, new)
    assert 0 < done_before < len(uris), f"the kill was not mid-run ({done_before} of {len(uris)} done)"

    record = _derive(manifest, old, new, slow)
    rows = assert_exactly_once(new, uris)
    assert all(r["status"] == "ok" for r in rows) and record["rerun_stages"] == ["paint", "describe"]
    assert all(s["record"]["paint"].startswith("green:") for s in _samples(new).values())
    assert len(record["attempts"]) == 2


@pytest.mark.slow
def test_retry_errors_reattempts_transient_failures_only(tmp_path, ray_local, doubles):
    uris = _inputs(tmp_path / "in", ["good.jpg", "transient.jpg", "permanent.jpg"])
    outage = tmp_path / "outage"
    outage.touch()
    out = tmp_path / "out"
    manifest = _manifest(
        tmp_path / "m.yaml", tmp_path / "in", out, {"flaky": f"params: {{outage: {outage}}}"}
    )
    run_pipeline(load_config(manifest))
    codes = {Path(r["uri"]).name: r["error_code"] for r in read_index(out).to_pylist()}
    assert codes == {"good.jpg": None, "transient.jpg": "timeout", "permanent.jpg": "unclassified"}

    outage.unlink()  # the server is back
    run_pipeline(load_config(manifest))  # a plain rerun keeps error rows: they are done
    assert read_index(out).column("error_code").to_pylist().count("timeout") == 1
    with pytest.raises(ConfigError, match="other settings"):  # refused before anything is withdrawn
        run_pipeline(load_config(manifest, ["stages.flaky.params.outage=elsewhere"]), retry_errors=True)
    assert read_index(out).column("error_code").to_pylist().count("timeout") == 1
    run_pipeline(load_config(manifest), retry_errors=True)
    rows = {Path(r["uri"]).name: r for r in assert_exactly_once(out, uris)}
    assert rows["transient.jpg"]["status"] == "ok" and rows["good.jpg"]["status"] == "ok"
    assert rows["permanent.jpg"]["error"] == "flaky: this input always breaks the stage"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError("read timed out"), "timeout"),
        (ConnectionRefusedError("refused"), "io"),
        (LLMUnavailable("no vllm here"), "llm_unavailable"),
        (MemoryError(), "out_of_memory"),
        (SampleError("server down", code="timeout"), "timeout"),
        (SampleError("cannot parse"), None),
        (KeyError("a stage bug"), None),
    ],
)
def test_stage_failures_are_classified_for_retry(exc, code):
    assert failure_code(exc) == code


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("request failed: gave up after 2 tries: timeout after 0.5s (ReadTimeout)", "timeout"),
        ("request failed: gave up after 3 tries: HTTP 503", "llm_unavailable"),
        ("request failed: response is not JSON: 'x'", "llm_output"),
        ("2 sentence(s), need at least 3", "llm_output"),
    ],
)
def test_llm_failures_are_classified_for_retry(reason, code):
    assert llm_failure_code(reason) == code


def test_a_derived_video_decodes_its_keyframes_only_for_pixel_stages(tmp_path):
    """OLD's stored video -> the rows a derived run's stages get: keyframes decoded (as the loader
    would) when a rerun stage reads pixels, empty placeholders otherwise; the record reset either way."""
    cfg = load_config(None, ["inputs=[x]"])
    frames = [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(8)]
    data = h264(frames, [i * 100 for i in range(8)])
    loaded = normalise_input("v.mp4", content_key(data), data, cfg.limits, cfg.video)
    record = {**loaded.record, "stamp": "old", "paint": "kept"}
    record["keyframes"][0]["stamp"] = "old"  # a field a stage wrote into a keyframe
    writer = ShardWriter(tmp_path, name="old-00000")
    writer.add_sample(
        loaded.key, data, "mp4", record, {"uri": "v.mp4", "status": "ok", "media_type": "video"}
    )
    writer.commit()
    plan = DerivePlan(
        rerun=["stamp"], reused=["paint"], removed=[], reset_fields={"stamp"}, reset_names={"stamp"}
    )
    batch = pa.Table.from_pylist(derived_items(tmp_path, set()))
    for pixels in (False, True):
        [row] = derived_load_batch(batch, str(tmp_path), plan, cfg.limits, cfg.video, pixels).to_pylist()
        out = json.loads(row["record"])
        assert row["data"] == data and "stamp" not in out and "stamp" not in out["keyframes"][0]
        assert out["paint"] == "kept" and len(row["frames"]) == len(out["keyframes"]) == cfg.video.keyframes
        if pixels:
            assert row["frames"] == loaded.frames
        else:
            assert row["frames"] == [b""] * cfg.video.keyframes


def test_outputs_recorded_with_masked_token_counts_still_resume():
    """Before token counts were unmasked, run.json held `***` for max_new_tokens: such a value cannot
    be compared, so resuming that output is not refused for it; a real change still is."""
    current = _record(DEMO)
    older = json.loads(json.dumps(current))
    older["config"]["stages"]["extra_context"]["params"]["max_new_tokens"] = "***"
    assert settings_changes(older, current) == []
    changed = _record(DEMO, ["stages.refexp.params.max_new_tokens=7"])
    assert settings_changes(older, changed) == ["stages.refexp.params.max_new_tokens"]
