"""Shared by the trainer's tests: quick training overrides, task mixes, the losses a run logged, and shards written
the way the engine writes them."""

import io
import json

import av
import numpy as np
from PIL import Image

from groundmill.model.config import TASKS
from groundmill.schema import content_key, encode_mask, mask_bbox, new_record
from groundmill.shards import ShardWriter

FAST = [
    "data.batch_size=4",
    "data.video_batch_size=2",
    "data.video_frames=4",
    "optim.warmup_steps=5",
    "log_every=1",
    "threads=2",
]


def only_tasks(*keep: str) -> list[str]:
    """Overrides that weigh every task but `keep` 0 (those keep their config weights): a task added
    later stays out of a test that names its mix."""
    return [f"data.tasks.{t}=0" for t in TASKS if t not in keep]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


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
