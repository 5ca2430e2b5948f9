"""Video at any length: frames decoded at training resolution, sparse-dense tokens, Mask Memory in order."""

import io

import av
import numpy as np
import torch
from PIL import Image

from groundmill.model.bench import TINY
from groundmill.model.config import load_config
from groundmill.model.data import collate
from groundmill.model.eval import evaluate
from groundmill.model.mllm import FRAME
from groundmill.model.modeling import PromptSlots
from groundmill.model.records import Clip, decode_video
from groundmill.model.tokenizer import trainer_processor
from groundmill.model.train import build_model, train
from groundmill.schema import content_key, encode_mask, new_record
from groundmill.shards import ShardWriter
from groundmill.tests.model_fixtures import FAST, only_tasks

LONG = 80  # longer than the 64-frame table the trainer used to have


def long_video_output(out, frames: int = LONG):
    """One engine-format video: a red square crossing a 96x80 frame, tracked and described on every frame."""
    buf, masks = io.BytesIO(), []
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 96, 80, "yuv420p"
        for i in range(frames):
            img = np.zeros((80, 96, 3), np.uint8)
            m = np.zeros((80, 96), bool)
            m[30:50, i % 70 : i % 70 + 20] = True
            img[m] = (220, 30, 30)
            masks.append(m)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    key = content_key(buf.getvalue())
    rec = new_record(key, {"uri": "v.mp4", "sha256": key, "bytes": 1, "format": "mp4"},
                     {"type": "video", "ext": "mp4", "width": 96, "height": 80, "fps": 10.0, "num_frames": frames}, [])  # fmt: skip
    rec["tracks"] = [{"track_id": 1, "labels": ["red square"], "masklet": [{"frame_index": i, "segmentation": encode_mask(m)} for i, m in enumerate(masks)],
                      "first_frame": 0, "last_frame": frames - 1, "consistency": 1.0}]  # fmt: skip
    rec["expressions"] = [
        {"track_id": 1, "object_level": "the red square", "video_level": "the square moving right"}
    ]
    w = ShardWriter(out, name="long-00000")
    w.add_sample(key, buf.getvalue(), "mp4", rec, {"uri": "v.mp4", "status": "ok", "media_type": "video"})
    w.commit()
    return buf.getvalue()


def test_clip_decodes_only_the_asked_frames_at_training_size(tmp_path):
    data = long_video_output(tmp_path / "v", frames=12)
    clip = Clip(data, 0, 128, None)
    assert len(clip) == 12
    frames = clip.take([9, 2, 2])
    full = decode_video(data)
    assert [f.shape for f in frames] == [(128, 128, 3)] * 3
    np.testing.assert_array_equal(frames[0], np.asarray(Image.fromarray(full[9]).resize((128, 128))))
    np.testing.assert_array_equal(frames[1], frames[2])


def test_a_video_longer_than_64_frames_trains_and_evaluates_on_every_frame(tmp_path):
    long_video_output(tmp_path / "long")
    only_video = only_tasks("video_referring", "video_object")
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'long'}}}]",
                             f"data.val=[{{path: {tmp_path / 'long'}}}]", *FAST, *only_video, "data.video_batch_size=1",
                             "optim.max_steps=1"])  # fmt: skip
    ckpt = train(cfg)
    results = evaluate(cfg, ckpt)
    assert results["video_referring"]["n"] == 1 and 0 <= results["video_referring"]["J&F"] <= 1
    assert results["video_object"]["n"] == 1


def test_sparse_dense_tokens_and_causal_mask_memory(tmp_path):
    data = long_video_output(tmp_path / "v", frames=LONG)
    cfg = load_config(
        # Without FrameMotion, whose differences look ahead in the clip: the Mask Memory's order is tested.
        TINY,
        [
            f"data.train=[{{path: {tmp_path / 'v'}}}]",
            "data.sparse_frames=16",
            "data.dense_frames=2",
            "decoder.motion=false",
        ],
    )
    processor = trainer_processor(cfg)
    clip = Clip(data, 0, 128, LONG).take(list(range(LONG)))
    row = {"question": "please segment the red square in the video .", "answer": "it is [SEG] .",
           "masks": [[np.zeros((128, 128), bool)] * LONG], "frames": clip}  # fmt: skip
    batch = collate([row], processor, PromptSlots(dense=2, sparse=16))
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(FRAME)).sum() == 16
    assert batch["mllm.pixel_values"].shape[0] == 2  # two dense frames through the VLM's vision tower
    assert batch["frames"].shape[:2] == (1, LONG) and batch["masks"].shape == (1, LONG, 128, 128)
    model = build_model(cfg, processor).eval()
    with torch.no_grad():
        masks = model(batch)["mask_logits"]
        assert masks.shape == (1, LONG, 128, 128)
        # Frame by frame in order: a frame's mask depends on the past only.
        feats, high_res, _ = model.encode_frames({"frames": batch["frames"][:, :10]})
        seg = torch.randn(1, cfg.decoder.seg_tokens, feats.shape[2])
        whole = model.decode(seg, feats, high_res)
        prefix = model.decode(seg, feats[:, :4], [m[:, :4] for m in high_res])
    torch.testing.assert_close(whole[:, :4], prefix)
    assert not torch.allclose(whole[:, 4], prefix[:, 3])
