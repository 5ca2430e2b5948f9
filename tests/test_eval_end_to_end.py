"""`groundmill eval` end to end: a checkpoint trained for 2 steps, evaluated on every benchmark layout
(tiny files written in each) and on its own val shards, through the CLI; the JSON report and the table."""

import json
import shutil

import pytest

from groundmill.model.bench import TINY
from groundmill.model.config import load_config
from groundmill.model.synthetic import write_split
from groundmill.model.train import train
from groundmill.pipeline.cli import main as cli
from groundmill.tests.benchmark_files import (
    write_davis,
    write_grandf,
    write_reasonseg,
    write_refcoco,
    write_rvos,
)

FAST = ["data.batch_size=4", "data.video_batch_size=2", "data.video_frames=4", "optim.warmup_steps=1",
        "optim.max_steps=2", "log_every=1", "threads=2", "eval_samples=3", "data.max_text_tokens=24"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_split(root / "train", images=12, videos=4, seed=5)
    write_split(root / "val", images=3, videos=1, seed=6)
    cfg = load_config(TINY, [f"out_dir={root / 'run'}", f"data.train=[{{path: {root / 'train'}}}]",
                             f"data.val=[{{path: {root / 'val'}}}]", *FAST])  # fmt: skip
    return root, train(cfg)


def benchmark_tree(root):
    write_refcoco(root / "refer_seg", "refcoco", "json")
    write_refcoco(root / "refer_seg_g", "refcocog", "parquet")
    write_reasonseg(root / "ReasonSeg")
    write_grandf(root / "GranDf")
    write_rvos(root / "ref-youtube-vos")
    write_rvos(root / "mevis", mevis=True)
    write_davis(root / "DAVIS")
    return {
        "refcoco": root / "refer_seg" / "refcoco",
        "refcocog": root / "refer_seg_g" / "refcocog",
        "reasonseg": root / "ReasonSeg",
        "grandf": root / "GranDf",
        "refytvos": root / "ref-youtube-vos",
        "mevis": root / "mevis",
        "davis17": root / "DAVIS",
    }


def test_groundmill_eval_runs_on_every_layout(checkpoint, tmp_path, capsys):
    root, ckpt = checkpoint
    benches = benchmark_tree(tmp_path)
    report_path = tmp_path / "report.json"
    args = [
        "eval",
        str(ckpt / "config.yaml"),
        str(ckpt),
        "--report",
        str(report_path),
        "--phrase-embedder",
        "minilm",
    ]
    for layout, path in benches.items():
        args += ["--bench", f"{layout}={path}"]
    args += ["--bench", f"shards={root / 'val'}"]
    assert cli(args) == 0
    report = json.loads(report_path.read_text())
    assert list(report["datasets"]) == [*benches, "shards"]
    expected_splits = {"refcoco": {"val", "testA"}, "refcocog": {"val"}, "reasonseg": {"val", "test", "test/long"},
                       "grandf": {"val"}, "refytvos": {"valid"}, "mevis": {"valid_u"}, "davis17": {"val"}}  # fmt: skip
    for name, splits in expected_splits.items():
        entry = report["datasets"][name]
        assert set(entry["splits"]) == splits and entry["protocol"], name
        for metrics in entry["splits"].values():
            assert metrics["n"] >= 1
            key = {"referring": "cIoU", "video": "J&F", "gcg": "mIoU"}[entry["task"]]
            assert 0.0 <= metrics[key] <= 1.0, (name, metrics)
    assert report["datasets"]["refcoco"]["splits"]["val"]["n"] == 2  # two sentences of the val ref
    assert report["datasets"]["mevis"]["splits"]["valid_u"]["n"] == 2  # two expressions
    assert report["datasets"]["davis17"]["splits"]["val"]["n"] == 2  # two objects
    gcg = report["datasets"]["grandf"]
    assert "all-MiniLM-L6-v2" in gcg["phrase_embedder"]
    if shutil.which("java"):
        assert {"METEOR", "CIDEr", "BLEU-4", "ROUGE-L"} <= set(gcg["splits"]["val"])
    shards = report["datasets"]["shards"]["splits"]
    assert {"referring", "referring_baseline", "video_referring", "vgd"} <= set(shards)
    out = capsys.readouterr().out
    for title in ("Referring segmentation, cIoU", "Video segmentation", "Grounded conversation generation"):
        assert title in out
    assert "[davis17] DAVIS-2017 semi-supervised protocol" in out and f"report: {report_path}" in out


def test_groundmill_eval_without_bench_reads_the_config_val_shards(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    report_path = tmp_path / "r.json"
    assert cli(["eval", str(ckpt / "config.yaml"), str(ckpt), "--report", str(report_path),
                "--phrase-embedder", "minilm", "eval_samples=1"]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    assert list(report["datasets"]) == ["shards"]
    assert 0.0 <= report["datasets"]["shards"]["splits"]["referring"]["cIoU"] <= 1.0


def test_a_pickled_refcoco_is_refused_through_the_cli(checkpoint, tmp_path):
    _, ckpt = checkpoint
    write_refcoco(tmp_path, "refcoco", "pickle")
    with pytest.raises(ValueError, match="does not load"):
        cli(["eval", str(ckpt / "config.yaml"), str(ckpt), "--bench", f"refcoco={tmp_path / 'refcoco'}"])
