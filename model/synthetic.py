"""Synthetic coloured-shapes shards in exactly the engine's format: the trainer's proof of learning.

Images: one colour-shape pair appears 2-3 times, next to an object sharing its colour and one sharing
its shape, on a noisy background; each object has a true mask, a referring expression and a phrase of a
grounded dense caption (optionally, hard negatives: the absent pairs that share a word with a present
one). A repeated pair's copies are told apart only by a relation that holds for that
copy alone (leftmost, largest, above the blue square...), so the colour and shape words do not suffice.
Videos: 8+ frames of 3-4 shapes moving in straight lines (bouncing off the borders), one pair twice with
different motions ("the red circle moving left"); in about half the videos the two copies are aimed at
each other so they overlap. Masks are the visible pixels (z-ordered).
Compositional split: the pairs in HELD_OUT never appear in a training split (`held_out=False`); in a
held-out split they are the repeated pair and one more object, so the words meet in new combinations.

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
# One pair per colour, every shape held out for some colour.
HELD_OUT = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "triangle"),
    ("purple", "circle"),
)
ALL_KINDS = [(c, s) for c in COLOURS for s in SHAPES]
TRAIN_KINDS = [k for k in ALL_KINDS if k not in HELD_OUT]


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


def pick_kinds(rng: random.Random, held_out: bool, copies: int, extra: int) -> list[tuple[str, str]]:
    """The repeated pair `copies` times, a same-colour and a same-shape distractor, `extra` more pairs.
    A training split never uses a HELD_OUT pair; a held-out split repeats one and adds another."""
    allowed = ALL_KINDS if held_out else TRAIN_KINDS
    colour, shape = repeated = rng.choice(HELD_OUT if held_out else TRAIN_KINDS)
    kinds = [repeated] * copies
    kinds.append(rng.choice([k for k in allowed if k[0] == colour and k != repeated]))
    kinds.append(rng.choice([k for k in allowed if k[1] == shape and k != repeated]))
    pool = [k for k in (HELD_OUT if held_out else allowed) if k not in kinds]
    return kinds + rng.sample(pool, extra)


def place(kinds: list[tuple[str, str]], rng: random.Random) -> list[Shape]:
    """Non-overlapping placement by rejection sampling; radii vary so sizes can tell copies apart."""
    while True:
        shapes: list[Shape] = []
        for colour, shape in kinds:
            for _ in range(100):
                r = rng.uniform(5.0, 10.0)
                s = Shape(
                    colour, shape, rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1), r
                )
                if all((s.cx - o.cx) ** 2 + (s.cy - o.cy) ** 2 > (s.r + o.r + 2) ** 2 for o in shapes):
                    shapes.append(s)
                    break
        if len(shapes) == len(kinds):
            return shapes


# Superlatives among a pair's copies: (word, key); the target must beat every other copy by a margin.
SUPERLATIVES = (
    ("leftmost", lambda s: -s.cx, 6.0),
    ("rightmost", lambda s: s.cx, 6.0),
    ("topmost", lambda s: -s.cy, 6.0),
    ("lowest", lambda s: s.cy, 6.0),
    ("largest", lambda s: s.r, 2.0),
    ("smallest", lambda s: -s.r, 2.0),
)


def unique(scene: list[Shape]) -> list[Shape]:
    """The objects whose pair appears once: the only ones a relation can name as its landmark."""
    return [o for o in scene if sum(p.name == o.name for p in scene) == 1]


def relational_expressions(target: Shape, scene: list[Shape]) -> list[str]:
    """Expressions that pick `target` among the copies of its pair and no other copy."""
    copies = [o for o in scene if o.name == target.name and o is not target]
    out = [
        f"the {word} {target.name}"
        for word, key, margin in SUPERLATIVES
        if all(key(target) - key(o) >= margin for o in copies)
    ]
    for other in unique(scene):
        rel = relation(target, other) if other.name != target.name else None
        if rel and all(relation(o, other) != rel for o in copies):
            out.append(f"the {target.name} {rel} the {other.name}")
    return out


def expression(target: Shape, scene: list[Shape], rng: random.Random) -> str | None:
    """A unique pair: 'the red circle', sometimes with a true relation ('... left of the blue square').
    A repeated pair: a relational expression that only this copy satisfies (None if there is none)."""
    if any(o.name == target.name and o is not target for o in scene):
        options = relational_expressions(target, scene)
        return rng.choice(options) if options else None
    base = rng.choice(["the {c} {s}", "the {s} that is {c}", "{c} {s}"]).format(
        c=target.colour, s=target.shape
    )
    if rng.random() < 0.5:
        others = [o for o in unique(scene) if o is not target and relation(target, o)]
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


def frame_annotations(shapes: list[Shape], masks: list[np.ndarray], rng: random.Random,
                      negatives: bool = False) -> dict:  # fmt: skip
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
    if any(r["expression"] is None for r in refs):
        return {}  # a copy no relation singles out: the caller draws another scene
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
    fields = {
        "objects": objects,
        "referring_expressions": refs,
        "dense_caption": {"caption": caption, "details": details},
        "gcg": {"caption": caption, "groundings": groundings},
    }
    return {**fields, "negatives": hard_negatives(shapes)} if negatives else fields


def hard_negatives(shapes: list[Shape]) -> list[str]:
    """The absent pairs a present object shares a colour or a shape with: SAM 3's hard negatives, the
    names a model that reads one word of two would find. Training pairs only, so no split names a
    HELD_OUT pair, even as absent."""
    present = {(s.colour, s.shape) for s in shapes}
    return [
        f"{c} {s}" for c, s in TRAIN_KINDS
        if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
    ]  # fmt: skip


def make_image(rng: random.Random, held_out: bool = False, negatives: bool = False) -> tuple[bytes, dict]:
    while True:
        shapes = place(
            pick_kinds(rng, held_out, rng.randint(2, 3), 1 if held_out else rng.randint(0, 1)), rng
        )
        rng.shuffle(shapes)  # the repeated pair's copies are not always first
        img, masks = render(shapes, rng, rng.randint(20, 90))
        fields = frame_annotations(shapes, masks, rng, negatives)
        if fields:
            break
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), fields


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


def simulate(
    rng: random.Random, num_frames: int, held_out: bool
) -> tuple[list, list, list[str], list[Shape]]:
    """Frames, per-shape visible masks, net motion words and the shapes (the repeated pair's two copies
    first) of one clip."""
    kinds = pick_kinds(rng, held_out, 2, 0)[: rng.randint(3, 4)]
    shapes = [Shape(c, s, 0, 0, rng.uniform(6.5, 9.0)) for c, s in kinds]
    steps = num_frames - 1
    velocity = []
    for s in shapes:
        s.cx, s.cy = rng.uniform(12, SIZE - 12), rng.uniform(12, SIZE - 12)
        velocity.append([rng.uniform(-3, 3), rng.uniform(-3, 3)])
    if rng.random() < 0.5:
        # Aim the two copies at a common meeting point so they overlap mid-video.
        mx, my = rng.uniform(24, 40), rng.uniform(24, 40)
        for s, v in zip(shapes[:2], velocity[:2], strict=True):
            v[0], v[1] = (mx - s.cx) * 2 / steps, (my - s.cy) * 2 / steps
    start = [(s.cx, s.cy) for s in shapes]
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
    motions = [motion_word(s.cx - x, s.cy - y) for s, (x, y) in zip(shapes, start, strict=True)]
    return frames, tracks_masks, motions, shapes


def make_video(rng: random.Random, num_frames: int = 8, held_out: bool = False) -> tuple[bytes, dict]:
    """3-4 moving shapes, one pair twice; the copies' net motions differ (drawn again until they do), and
    their only expression is that motion ("the red circle moving left")."""
    while True:
        frames, tracks_masks, motions, shapes = simulate(rng, num_frames, held_out)
        if motions[0] != motions[1]:  # the two copies come first
            break
    first_masks = [t[0] for t in tracks_masks]
    keyframe = {"frame_index": 0, "time_s": 0.0, **frame_annotations(shapes, first_masks, rng)}
    keyframe.pop("gcg", None)
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
        moving = f"the {s.name} {motions[i]}"
        expressions.append(
            {
                "track_id": i,
                "object_level": moving if i < 2 else f"the {s.name}",
                "scene_level": f"the {s.name} among {len(shapes)} shapes",
                "video_level": moving,
            }
        )
    times = [{"frame_index": f, "time_s": f / 8} for f in range(num_frames)]
    fields = {"keyframes": [keyframe], "tracks": tracks, "frame_times": times, "expressions": expressions}
    return encode_video(frames), fields


def write_split(out_dir: str | Path, images: int, videos: int, seed: int, per_shard: int = 250,
                held_out: bool = False, negatives: bool = False) -> None:  # fmt: skip
    """Write `images` image samples and `videos` video samples as shards of at most `per_shard`, images
    and videos in shards of their own (one media extension per shard, as the engine writes them): a
    training split without the HELD_OUT pairs, or (`held_out`) a compositional split built on them.
    `negatives`: images also carry their hard negatives (the trainer then asks a third of its referring
    questions about absent pairs, answered "there is none")."""
    rng = random.Random(seed)
    jobs = ["image"] * images + ["video"] * videos
    for start in range(0, len(jobs), per_shard):
        kinds = dict.fromkeys(jobs[start : start + per_shard])
        writers = {
            k: ShardWriter(out_dir, name=f"synthetic-{seed}-{k}-{start // per_shard:05d}") for k in kinds
        }
        for n, kind in enumerate(jobs[start : start + per_shard], start):
            writer = writers[kind]
            data, fields = (
                make_image(rng, held_out, negatives)
                if kind == "image"
                else make_video(rng, held_out=held_out)
            )
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
    p.add_argument("--held-out", action="store_true", help="the compositional split (HELD_OUT pairs)")
    p.add_argument("--negatives", action="store_true", help="images carry their hard negatives")
    a = p.parse_intermixed_args(argv)
    write_split(a.out_dir, a.images, a.videos, a.seed, held_out=a.held_out, negatives=a.negatives)


if __name__ == "__main__":
    main()
