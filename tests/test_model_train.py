"""The trainer: config validation, loss falls, exact resume, engine-format shards, eval end to end."""

import io
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from groundmill.model import data as data_module
from groundmill.model.bench import TINY
from groundmill.model.config import load_config
from groundmill.model.data import TaskBatches
from groundmill.model.eval import evaluate
from groundmill.model.mllm import make_processor
from groundmill.model.synthetic import write_split
from groundmill.model.tokenizer import build_word_tokenizer, trainer_processor
from groundmill.model.train import build_model, train
from groundmill.model.train import main as train_main
from groundmill.schema import content_key, encode_mask, mask_bbox, new_record
from groundmill.shards import ShardWriter

# Small and quick: batches of 4 images / 2 videos of 4 frames.
FAST = [
    "data.batch_size=4",
    "data.video_batch_size=2",
    "data.video_frames=4",
    "optim.warmup_steps=5",
    "log_every=1",
    "threads=2",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train", images=40, videos=8, seed=5)
    write_split(root / "val", images=6, videos=2, seed=6)
    return root


def config(shards, out, *extra):
    return load_config(
        TINY,
        [
            f"out_dir={out}",
            f"data.train=[{{path: {shards / 'train'}}}]",
            f"data.val=[{{path: {shards / 'val'}}}]",
        ]
        + FAST
        + list(extra),
    )


def test_non_positive_sizes_are_named():
    with pytest.raises(ValueError, match="data.targets_per_record"):
        load_config(None, ["data.targets_per_record=0"])


def test_referring_rows_share_one_encoded_image(shards, tmp_path):
    only_referring = [
        f"data.tasks.{t}=0" for t in ("gcg", "interactive", "vgd", "video_referring", "video_object")
    ]
    cfg = config(shards, tmp_path, "data.targets_per_record=3", *only_referring)
    tok = trainer_processor(cfg)
    batch = next(iter(TaskBatches(cfg, tok)))
    rows, images = batch["input_ids"].shape[0], batch["frames"].shape[0]
    assert rows >= cfg.data.batch_size and images < rows  # every synthetic image has >= 3 expressions
    assert batch["row_frames"].tolist() == sorted(batch["row_frames"].tolist())  # a record's rows together
    assert batch["masks"].shape[0] == rows
    # Rows on one image ask for different objects.
    first = (batch["row_frames"] == 0).nonzero()[:, 0]
    assert len(first) > 1 and not torch.equal(batch["masks"][first[0]], batch["masks"][first[1]])
    # Sharing is only a saving: each row's masks are those of the row alone in its own batch.
    model = build_model(cfg, tok).eval()
    with torch.no_grad():
        shared = model(batch)["mask_logits"]
        r = int(first[1])
        ids = batch["input_ids"][r : r + 1, : int(batch["attention_mask"][r].sum())]
        pixels = batch["mllm.pixel_values"][r : r + 1]
        alone = model({"frames": batch["frames"][:1], "input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "mllm.pixel_values": pixels})  # fmt: skip
    torch.testing.assert_close(alone["mask_logits"][0], shared[r], atol=1e-4, rtol=1e-4)


def test_sources_without_usable_annotations_fail_with_the_reason(tmp_path, monkeypatch):
    # Records with no objects, expressions or tracks (random-weight detectors find nothing, say).
    w = ShardWriter(tmp_path / "bare", name="bare-00000")
    for i in range(3):
        data = png_bytes(i)
        key = content_key(data)
        rec = new_record(key, {"uri": f"{i}.png", "sha256": key, "bytes": len(data), "format": "png"},
                         {"type": "image", "ext": "png", "width": 64, "height": 64}, [])  # fmt: skip
        w.add_sample(key, data, "png", rec, {"uri": f"{i}.png", "status": "ok", "media_type": "image"})
    w.commit()
    monkeypatch.setattr(data_module, "MAX_BARREN_RECORDS", 20)
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'bare'}}}]"])
    with pytest.raises(ValueError, match="gave no sample"):
        next(iter(TaskBatches(cfg, make_processor(cfg.mllm, build_word_tokenizer([])))))


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_unknown_config_key_is_named():
    with pytest.raises(Exception, match="lrr"):
        load_config(None, ["optim.lrr=1"])


def test_loss_falls(shards, tmp_path):
    train(
        config(
            shards,
            tmp_path,
            "optim.max_steps=30",
            "optim.lr=2e-3",
            "data.tasks={gcg: 0, interactive: 0, vgd: 0, video_object: 0}",
        )
    )
    log = losses(tmp_path)
    first, last = np.mean([log[s] for s in range(1, 6)]), np.mean([log[s] for s in range(26, 31)])
    assert last < 0.7 * first


def test_resume_gives_the_same_next_step_loss(shards, tmp_path, monkeypatch):
    extra = ["optim.max_steps=4", "ckpt_every=2"]
    reads = []
    rows = TaskBatches.rows
    monkeypatch.setattr(TaskBatches, "rows", lambda self, *a: reads.append(a) or rows(self, *a))
    train(config(shards, tmp_path / "full", *extra))
    full_reads, reads[:] = list(reads), []
    resumed = tmp_path / "resumed"
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000002"
    train_main(
        [str(ckpt / "config.yaml"), "--resume", str(ckpt), f"out_dir={resumed}"]
    )  # overrides may follow
    full, again = losses(tmp_path / "full"), losses(resumed)
    assert set(again) == {3, 4}
    assert again[3] == full[3] and again[4] == full[4]
    # From the stored position: the records of steps 1-2 are not read again (only buffered ones).
    assert set(reads) < set(full_reads) and len(reads) < len(full_reads) * 3 / 4


def engine_like_output(out):
    """Shards the way the engine writes them: a JPEG larger than the model's input and a video whose
    masklet covers only some frames, with a referring expression, a dense caption and no GCG form."""
    rng = np.random.default_rng(0)
    w = ShardWriter(out, name="engine-00000")
    img = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    masks = [np.zeros((90, 120), bool) for _ in range(2)]
    masks[0][10:40, 10:50] = True
    masks[1][50:80, 60:110] = True
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    key = content_key(buf.getvalue())
    rec = new_record(key, {"uri": "a.jpg", "sha256": key, "bytes": 1, "format": "jpeg"},
                     {"type": "image", "ext": "jpg", "width": 120, "height": 90}, [])  # fmt: skip
    rles = [encode_mask(m) for m in masks]
    rec["objects"] = [
        {
            "id": i,
            "bbox": mask_bbox(r),
            "labels": [lab],
            "attributes": [],
            "score": 0.9,
            "detectors": ["owlv2"],
            "segmentation": r,
            "segmentation_source": "SAM2",
        }  # fmt: skip
        for i, (r, lab) in enumerate(zip(rles, ["dog", "frisbee"], strict=True))
    ]
    rec["referring_expressions"] = [{"object_id": 1, "expression": "the frisbee in the air", "source": "llm"}]
    caption = "A dog jumps for a frisbee."
    rec["dense_caption"] = {"caption": caption, "details": [
        {"phrase": "A dog", "tokens_positive": [0, 5], "ids": [0], "bbox": [rec["objects"][0]["bbox"]]},
        {"phrase": "a frisbee", "tokens_positive": [16, 25], "ids": [1], "bbox": [rec["objects"][1]["bbox"]]},
    ]}  # fmt: skip
    w.add_sample(key, buf.getvalue(), "jpg", rec, {"uri": "a.jpg", "status": "ok", "media_type": "image"})

    vbuf = io.BytesIO()
    with av.open(vbuf, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 96, 80, "yuv420p"
        for _ in range(12):
            frame = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    vkey = content_key(vbuf.getvalue())
    vrec = new_record(vkey, {"uri": "v.mp4", "sha256": vkey, "bytes": 1, "format": "mp4"},
                      {"type": "video", "ext": "mp4", "width": 96, "height": 80, "fps": 10.0, "num_frames": 12}, [])  # fmt: skip
    m = np.zeros((80, 96), bool)
    m[20:50, 30:70] = True
    vrec["schema_version"] = 1  # a v1 record (frame-keyed masklet): the trainer reads it as v2
    vrec["tracks"] = [{"track_id": 7, "labels": ["car"], "masklet": {str(i): encode_mask(m) for i in (0, 3, 6, 9)},
                       "first_frame": 0, "last_frame": 9, "consistency": 0.8}]  # fmt: skip
    vrec["expressions"] = [
        {"track_id": 7, "object_level": "the red car", "video_level": "the car driving away"}
    ]
    w.add_row({"uri": "broken.jpg", "status": "error", "error": "decode"})
    w.commit()
    videos = ShardWriter(out, name="engine-video-00000")  # one media extension per shard
    videos.add_sample(
        vkey, vbuf.getvalue(), "mp4", vrec, {"uri": "v.mp4", "status": "ok", "media_type": "video"}
    )
    videos.commit()


def test_trainer_reads_engine_shards(tmp_path):
    engine_like_output(tmp_path / "engine")
    cfg = load_config(
        TINY,
        [
            f"out_dir={tmp_path / 'run'}",
            f"data.train=[{{path: {tmp_path / 'engine'}}}]",
            *FAST,
            "data.batch_size=2",
            "data.video_batch_size=1",
            "optim.max_steps=3",
        ],  # fmt: skip
    )
    processor = trainer_processor(cfg)
    tok = processor.tokenizer
    assert tok.tokenize("the frisbee in the air") == ["the", "frisbee", "in", "the", "air"]
    seen = set()
    for batch, _ in zip(TaskBatches(cfg, processor), range(12), strict=False):
        assert batch["frames"].shape[-2:] == (128, 128)
        assert batch["masks"].shape[0] == (batch["input_ids"] == tok.convert_tokens_to_ids("[SEG]")).sum()
        seen.add(batch["frames"].shape[1])
    assert seen == {1, 4}  # image and video batches
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step-0000003" / "model.safetensors").exists()


def test_eval_reports_every_task(shards, tmp_path):
    ckpt = train(config(shards, tmp_path, "optim.max_steps=2"))
    results = evaluate(config(shards, tmp_path), ckpt, gcg_limit=2)
    for task in ("referring", "interactive", "vgd", "gcg", "video_referring", "video_object"):
        assert task in results
    assert 0 <= results["referring"]["cIoU"] <= 1 and 0 <= results["video_referring"]["J&F"] <= 1
    assert {"AP50", "mIoU", "recall"} <= set(results["gcg"])


def test_full_size_manifest_is_a_valid_config():
    cfg = load_config(TINY.parent / "train_x2sam.yaml")
    assert cfg.vision.checkpoint == "facebook/sam2.1-hiera-large" and cfg.mllm.lora and cfg.freeze_vision
    assert (cfg.loss.ce, cfg.loss.bce, cfg.loss.dice) == (1.0, 2.0, 0.5)
