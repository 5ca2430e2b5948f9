"""Synthetic coloured-shapes shards in exactly the engine's format: the trainer's proof of learning.

Images: >= 3 shapes drawn from 5 colours x 3 shapes on a noisy background, each with a true mask, a
referring expression and a phrase of a grounded dense caption. Every scene has a "hard" target when
possible: another object shares its colour and another shares its shape, so neither word alone picks it.
Videos: 8+ frames of 3-4 shapes moving in straight lines (bouncing off the borders); in about half the
videos two of them are aimed at each other so they overlap. Masks are the visible pixels (z-ordered).

Run: ``python -m groundmill.model.synthetic OUT_DIR --images N --videos M --seed S``.
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from groundmill.schema import (
    STATUS_OK,
    Record,
    content_key,
    encode_mask,
    mask_bbox,
    new_record,
)
from groundmill.shards import ShardWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64


@dataclass
class Shape:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def draw_mask(s: Shape, size: int = SIZE) -> np.ndarray:
    """Filled silhouette of a shape (bool HxW)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - s.cx, yy - s.cy
    if s.shape == "circle":
        return dx**2 + dy**2 <= s.r**2
    if s.shape == "square":
        half = s.r * 0.85  # about the same area as the circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward triangle: inside the three half-planes.
    top, bottom, half_w = -s.r, s.r * 0.8, s.r * 1.1
    t = (dy - top) / (bottom - top)
    return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= t * half_w)


def render(shapes: list[Shape], rng: random.Random, grey: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB uint8 image on a noisy `grey` background and each shape's visible mask (later ones on top)."""
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 8, (SIZE, SIZE, 3))
    img = np.clip(grey + noise, 0, 255)
    visible = np.zeros((SIZE, SIZE), np.int32) - 1
    for i, s in enumerate(shapes):
        visible[draw_mask(s)] = i
    for i, s in enumerate(shapes):
        img[visible == i] = np.array(COLOURS[s.colour]) + rng.uniform(-15, 15)
    return img.astype(np.uint8), [visible == i for i in range(len(shapes))]


def relation(a: Shape, b: Shape) -> str | None:
    """A spatial relation of a to b that clearly holds (None if they are too close to tell)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if max(abs(dx), abs(dy)) < 8:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def pick_kinds(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs; the first is a target with a same-colour and a same-shape distractor."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    kinds = [
        (colour, shape),
        (colour, rng.choice([s for s in SHAPES if s != shape])),
        (rng.choice([c for c in COLOURS if c != colour]), shape),
    ]
    pool = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in kinds]
    kinds += rng.sample(pool, n - 3)
    return kinds


def place(kinds: list[tuple[str, str]], rng: random.Random) -> list[Shape]:
    """Non-overlapping placement by rejection sampling."""
    while True:
        shapes: list[Shape] = []
        for colour, shape in kinds:
            for _ in range(100):
                r = rng.uniform(6.5, 10.0)
                s = Shape(
                    colour, shape, rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1), r
                )
                if all((s.cx - o.cx) ** 2 + (s.cy - o.cy) ** 2 > (s.r + o.r + 2) ** 2 for o in shapes):
                    shapes.append(s)
                    break
        if len(shapes) == len(kinds):
            return shapes


def expression(target: Shape, scene: list[Shape], rng: random.Random) -> str:
    """'the red circle', sometimes with a true relation to another object ('... left of the blue square')."""
    base = rng.choice(["the {c} {s}", "the {s} that is {c}", "{c} {s}"]).format(
        c=target.colour, s=target.shape
    )
    if rng.random() < 0.5:
        others = [o for o in scene if o is not target and relation(target, o)]
        if others:
            other = rng.choice(others)
            base = f"{base} {relation(target, other)} the {other.name}"
    return base


def caption_with_spans(names: list[str], ids: list[int]) -> tuple[str, list[tuple[str, int, int, int]]]:
    """'There is a red circle, a blue square and a green triangle.' plus (phrase, start, end, id)."""
    caption, spans = "there is ", []
    for i, (name, oid) in enumerate(zip(names, ids, strict=True)):
        if i:
            caption += " and " if i == len(names) - 1 else " , "
        phrase = f"a {name}"
        spans.append((phrase, len(caption), len(caption) + len(phrase), oid))
        caption += phrase
    return caption + " .", spans


def frame_annotations(shapes: list[Shape], masks: list[np.ndarray], rng: random.Random) -> dict:
    """The per-image record fields: objects, referring expressions, dense caption and GCG form."""
    objects, refs = [], []
    for i, (s, m) in enumerate(zip(shapes, masks, strict=True)):
        rle = encode_mask(m)
        objects.append(
            {
                "id": i,
                "bbox": mask_bbox(rle),
                "labels": [s.name, s.shape],
                "attributes": [s.colour],
                "score": 1.0,
                "detectors": ["synthetic"],
                "segmentation": rle,
                "segmentation_source": "synthetic",
            }
        )
        refs.append({"object_id": i, "expression": expression(s, shapes, rng), "source": "synthetic"})
    order = sorted(range(len(shapes)), key=lambda i: shapes[i].cx)  # left to right, like a reader
    caption, spans = caption_with_spans([shapes[i].name for i in order], order)
    details = [
        {"phrase": p, "tokens_positive": [a, b], "ids": [oid], "bbox": [objects[oid]["bbox"]]}
        for p, a, b, oid in spans
    ]
    groundings = [
        {
            "phrase": p,
            "tokens_positive": [a, b],
            "object_ids": [oid],
            "rle_masks": [objects[oid]["segmentation"]],
        }
        for p, a, b, oid in spans
    ]
    return {
        "objects": objects,
        "referring_expressions": refs,
        "dense_caption": {"caption": caption, "details": details},
        "gcg": {"caption": caption, "groundings": groundings},
    }


def make_image(rng: random.Random) -> tuple[bytes, dict]:
    shapes = place(pick_kinds(rng.randint(3, 5), rng), rng)
    rng.shuffle(shapes)  # the hard target is not always first
    img, masks = render(shapes, rng, rng.randint(20, 90))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), frame_annotations(shapes, masks, rng)


def encode_video(frames: list[np.ndarray], fps: int = 8) -> bytes:
    """Near-lossless H.264 (yuv444, crf 0) so the colours survive the round trip."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv444p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def motion_word(vx: float, vy: float) -> str:
    if abs(vx) >= abs(vy):
        return "moving right" if vx > 0 else "moving left"
    return "moving down" if vy > 0 else "moving up"


def make_video(rng: random.Random, num_frames: int = 8) -> tuple[bytes, dict]:
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(3, 4))
    shapes = [Shape(c, s, 0, 0, rng.uniform(6.5, 9.0)) for c, s in kinds]
    steps = num_frames - 1
    velocity = []
    for s in shapes:
        s.cx, s.cy = rng.uniform(12, SIZE - 12), rng.uniform(12, SIZE - 12)
        velocity.append([rng.uniform(-3, 3), rng.uniform(-3, 3)])
    if rng.random() < 0.5:
        # Aim the first two at a common meeting point so they overlap mid-video.
        mx, my = rng.uniform(24, 40), rng.uniform(24, 40)
        for s, v in zip(shapes[:2], velocity[:2], strict=True):
            v[0], v[1] = (mx - s.cx) * 2 / steps, (my - s.cy) * 2 / steps
    frames, tracks_masks, grey = [], [[] for _ in shapes], rng.randint(20, 90)
    for _ in range(num_frames):
        img, masks = render(shapes, rng, grey)
        frames.append(img)
        for t, m in zip(tracks_masks, masks, strict=True):
            t.append(m)
        for s, v in zip(shapes, velocity, strict=True):
            for axis in (0, 1):  # move, bouncing off the borders
                pos = (s.cx, s.cy)[axis] + v[axis]
                if pos < s.r or pos > SIZE - s.r:
                    v[axis] = -v[axis]
                    pos = (s.cx, s.cy)[axis] + v[axis]
                if axis == 0:
                    s.cx = pos
                else:
                    s.cy = pos
    first_masks = [t[0] for t in tracks_masks]
    keyframe = {"frame_index": 0, "time_s": 0.0, **frame_annotations(shapes, first_masks, rng)}
    keyframe.pop("gcg")
    tracks, expressions = [], []
    for i, (s, ms) in enumerate(zip(shapes, tracks_masks, strict=True)):
        tracks.append(
            {
                "track_id": i,
                "labels": [s.name, s.shape],
                "masklet": [{"frame_index": f, "segmentation": encode_mask(m)} for f, m in enumerate(ms)],
                "first_frame": 0,
                "last_frame": num_frames - 1,
                "consistency": 1.0,
            }
        )
        v = velocity[i]
        expressions.append(
            {
                "track_id": i,
                "object_level": f"the {s.name}",
                "scene_level": f"the {s.name} among {len(shapes)} shapes",
                "video_level": f"the {s.name} {motion_word(*v)}",
            }
        )
    times = [{"frame_index": f, "time_s": f / 8} for f in range(num_frames)]
    fields = {"keyframes": [keyframe], "tracks": tracks, "frame_times": times, "expressions": expressions}
    return encode_video(frames), fields


def write_split(out_dir: str | Path, images: int, videos: int, seed: int, per_shard: int = 250) -> None:
    """Write `images` image samples and `videos` video samples as shards of at most `per_shard`, images
    and videos in shards of their own (one media extension per shard, as the engine writes them)."""
    rng = random.Random(seed)
    jobs = ["image"] * images + ["video"] * videos
    for start in range(0, len(jobs), per_shard):
        kinds = dict.fromkeys(jobs[start : start + per_shard])
        writers = {
            k: ShardWriter(out_dir, name=f"synthetic-{seed}-{k}-{start // per_shard:05d}") for k in kinds
        }
        for n, kind in enumerate(jobs[start : start + per_shard], start):
            writer = writers[kind]
            data, fields = make_image(rng) if kind == "image" else make_video(rng)
            ext = "png" if kind == "image" else "mp4"
            key = content_key(data)
            media = {"type": kind, "ext": ext, "width": SIZE, "height": SIZE}
            if kind == "video":
                media.update(fps=8.0, num_frames=len(fields["tracks"][0]["masklet"]))
            record: Record = new_record(
                key,
                {"uri": f"synthetic://{seed}/{n}", "sha256": key, "bytes": len(data), "format": ext},
                media,
                [],
            )
            record.update(fields)
            if kind == "image":
                record["gcg"]["file_name"] = f"{key}.{ext}"
            row = {
                "uri": record["source"]["uri"],
                "media_type": kind,
                "bytes": len(data),
                "width": SIZE,
                "height": SIZE,
                "status": STATUS_OK,
                "num_objects": len(fields.get("objects", fields.get("tracks", []))),
            }
            writer.add_sample(key, data, ext, record, row)
        for writer in writers.values():
            writer.commit()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_intermixed_args(argv)
    write_split(a.out_dir, a.images, a.videos, a.seed)


if __name__ == "__main__":
    main()
