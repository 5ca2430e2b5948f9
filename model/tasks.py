"""Record -> task samples (X2SAM's image and video tasks) and the visual prompts drawn from masks.

A sample: question, answer, frames (T,S,S,3), masks (Q,T,S,S) in [SEG] order, optional region (map,
type, frame). Tasks, chosen per record with the configured weights among those its annotations support:
  referring        referring_expressions[i]            "please segment {expr} ." -> "it is [SEG] ."
                   negatives[i] (verified absent)        "please segment {phrase} ." -> "there is none , [SEG] ." (empty mask)
  gcg              gcg / dense_caption spans            "... grounded caption ." -> "<p> a red circle </p> [SEG] ..."
  interactive      a visual prompt drawn from a mask    "please segment <region> ." -> "it is [SEG] ."
  vgd              same, target: all same-label objects
  video_referring  expressions[i] + track masklet       over T frames (sparse-dense sampling)
  video_object     a first-frame mask prompt + masklet
Referring tasks ask up to `targets_per_record` questions of one record (LISA's num_classes_per_sample).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from groundmill.model.config import DataConfig
from groundmill.model.modeling import P_CLOSE, P_OPEN, PROMPT_TYPES, REGION, SEG
from groundmill.model.records import Clip, mask_at
from groundmill.schema import masklet_by_frame

IMAGE_TASKS = ("referring", "semantic", "gcg", "interactive", "vgd", "generic")
VIDEO_TASKS = ("video_referring", "video_object")
QUESTIONS = {
    "referring": "please segment {} .",
    "semantic": "please segment {} .",  # LISA asks its semantic-segmentation rows as it asks referring ones
    "gcg": "please give a grounded caption of the image .",
    "interactive": "please segment {} .",
    "vgd": "please segment everything like {} .",
    "generic": "please segment every object of these categories .",
    "video_referring": "please segment {} in the video .",
    "video_object": "please track {} in the video .",
}
ANSWER = f"it is {SEG} ."
# A hard negative (a phrase verified absent, the record's `negatives`): the target is an empty mask and
# the answer says there is none (SAM 3's negatives; GRES's no-target expressions).
NO_TARGET_ANSWER = f"there is none , {SEG} ."


# Visual prompts drawn from masks (X2SAM's VGD recipe, scaled to the image size).


def draw_prompt(mask: np.ndarray, kind: str, rng: random.Random) -> np.ndarray:
    """A point / scribble / box / mask prompt map (float HxW) drawn from a non-empty bool mask."""
    size = mask.shape[0]
    radius = max(1.0, size / 100)  # X2SAM: point radius 10 at ~1000 px
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "mask":
        return mask.astype(np.float32)
    if kind == "box":
        out = np.zeros_like(mask, np.float32)
        out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
        return out
    n = 1 if kind == "point" else 6  # a scribble: a short random walk of points inside the mask
    idx = [rng.randrange(len(ys))]
    for _ in range(n - 1):
        near = np.nonzero((np.abs(ys - ys[idx[-1]]) <= 3) & (np.abs(xs - xs[idx[-1]]) <= 3))[0]
        idx.append(int(rng.choice(near)))
    out = np.zeros_like(mask, bool)
    for i in idx:
        out |= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= radius**2
    return out.astype(np.float32)


def _objects_with_masks(frame: dict) -> list[dict]:
    return [o for o in frame.get("objects", []) if o.get("segmentation")]


def referring_targets(record: dict, size: int) -> list[tuple[str, np.ndarray]]:
    """(expression, target mask) for every referring expression whose object has a mask."""
    by_id = {o["id"]: o for o in _objects_with_masks(record)}
    refs = [r for r in record.get("referring_expressions", []) if r.get("object_id") in by_id]
    return [(r["expression"], mask_at(by_id[r["object_id"]]["segmentation"], size)) for r in refs]


def referring_samples(record: dict, rng: random.Random, size: int, k: int) -> list[dict]:
    """Up to k referring rows of one image, distinct targets; a third of them at most (one at least,
    when the record has any) ask for a hard negative, whose target is empty."""
    targets = referring_targets(record, size)
    negatives = list(record.get("negatives", []))
    n_neg = min(len(negatives), max(1, k // 3), k)
    picked = rng.sample(targets, min(k - n_neg, len(targets)))
    empty = np.zeros((size, size), bool)
    rows = [(expr, mask, ANSWER) for expr, mask in picked]
    rows += [(phrase, empty, NO_TARGET_ANSWER) for phrase in rng.sample(negatives, n_neg)]
    return [
        {
            "task": "referring",
            "question": QUESTIONS["referring"].format(expr),
            "answer": answer,
            "masks": [[mask]],
        }
        for expr, mask, answer in rows
    ]


def semantic_samples(
    record: dict, rng: random.Random, size: int, k: int, attribute_free: bool = False,
    attributes: bool = False,
) -> list[dict]:  # fmt: skip
    """Up to k rows of one image, each a label of its objects (any of an object's labels) whose target is
    every object carrying it: LISA's semantic-segmentation data (one class name -> its whole mask) from the
    engine's own labels. A class word then has to be seen in the pixels, whatever else the objects share.
    `attribute_free`: only labels with no word of any object's attributes (for a greyscale image).
    `attributes`: an object's attributes are asked too ("red" -> every red object, whatever its class)."""
    objects = [o for o in _objects_with_masks(record) if o.get("labels")]
    names = [set(o["labels"]) | (set(o.get("attributes", [])) if attributes else set()) for o in objects]
    labels = sorted(set().union(*names))
    if attribute_free:
        attribute_words = {w for o in objects for a in o.get("attributes", []) for w in a.split()}
        labels = [label for label in labels if not attribute_words & set(label.split())]
    rows = []
    for label in rng.sample(labels, min(k, len(labels))):
        masks = [mask_at(o["segmentation"], size) for o, n in zip(objects, names, strict=True) if label in n]
        rows.append({"task": "semantic", "question": QUESTIONS["semantic"].format(label), "answer": ANSWER,
                     "masks": [[np.logical_or.reduce(masks)]]})  # fmt: skip
    return rows


def chance(rng: random.Random, share: float) -> bool:
    """True with probability `share`; a share of 0 draws nothing, so configs without the option keep their
    random stream (and their samples) unchanged."""
    return bool(share) and rng.random() < share


def to_grayscale(frame: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 -> its ITU-R 601 luma (PIL's "L") in all three channels, as torchvision's
    RandomGrayscale."""
    return np.repeat(np.asarray(Image.fromarray(frame).convert("L"))[..., None], 3, axis=-1)


def rotate_hue(frame: np.ndarray, shift: int) -> np.ndarray:
    """(H,W,3) uint8 with every hue turned by shift/256 of the circle (PIL's HSV), as torchvision's
    ColorJitter(hue=...) does: the same shapes in other colours."""
    hsv = np.asarray(Image.fromarray(frame).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def gcg_phrases(record: dict, size: int) -> tuple[str, list[tuple[int, int]], list[np.ndarray]] | None:
    """(caption, phrase spans, phrase masks) from the GCG form, else from the dense caption's details."""
    if record.get("gcg", {}).get("groundings"):
        g = record["gcg"]
        items = [(v["tokens_positive"], v["rle_masks"]) for v in g["groundings"]]
        caption = g["caption"]
    elif record.get("dense_caption", {}).get("details"):
        by_id = {o["id"]: o for o in _objects_with_masks(record)}
        caption = record["dense_caption"]["caption"]
        items = [
            (d["tokens_positive"], [by_id[i]["segmentation"] for i in d["ids"] if i in by_id])
            for d in record["dense_caption"]["details"]
        ]
    else:
        return None
    items = sorted((tuple(span), rles) for span, rles in items if rles)
    if not items:
        return None
    masks = [np.logical_or.reduce([mask_at(r, size) for r in rles]) for _, rles in items]
    return caption, [span for span, _ in items], masks


def mark_caption(caption: str, spans: list[tuple[int, int]]) -> str:
    """'a red circle and ...' -> '<p> a red circle </p> [SEG] and ...' (spans sorted, non-overlapping)."""
    out, last = [], 0
    for s, e in spans:
        out += [caption[last:s], f"{P_OPEN} {caption[s:e]} {P_CLOSE} {SEG}"]
        last = e
    return "".join(out + [caption[last:]])


def gcg_sample(record: dict, rng: random.Random, size: int) -> dict | None:
    parsed = gcg_phrases(record, size)
    if parsed is None:
        return None
    caption, spans, masks = parsed
    keep = [i for i, (s, _) in enumerate(spans) if i == 0 or s >= spans[i - 1][1]]  # drop overlapping spans
    return {"task": "gcg", "question": QUESTIONS["gcg"], "answer": mark_caption(caption, [spans[i] for i in keep]),
            "masks": [[masks[i]] for i in keep]}  # fmt: skip


def prompt_sample(record: dict, rng: random.Random, size: int, task: str) -> dict | None:
    """interactive: segment the prompted object; vgd: segment every object sharing its label."""
    objects = _objects_with_masks(record)
    masks = [mask_at(o["segmentation"], size) for o in objects]
    chosen = [i for i, m in enumerate(masks) if m.any()]
    if not chosen:
        return None
    i = rng.choice(chosen)
    kind = rng.choice(PROMPT_TYPES)
    target = masks[i]
    if task == "vgd":
        label = objects[i]["labels"][0] if objects[i]["labels"] else None
        target = np.logical_or.reduce(
            [m for o, m in zip(objects, masks, strict=True) if o["labels"][:1] == [label]]
        )
    return {"task": task, "question": QUESTIONS[task].format(REGION), "answer": ANSWER, "masks": [[target]],
            "region": (draw_prompt(masks[i], kind, rng), PROMPT_TYPES.index(kind), 0)}  # fmt: skip


def generic_sample(record: dict, rng: random.Random, size: int) -> dict | None:
    """Every labelled object as an instance of its category (the object's first label); the answer
    names the categories in a random order, each with a [SEG] that becomes its class embedding."""
    objects = [o for o in _objects_with_masks(record) if o.get("labels")]
    if not objects:
        return None
    categories = sorted({o["labels"][0] for o in objects})
    rng.shuffle(categories)
    answer = " , ".join(f"{P_OPEN} {c} {P_CLOSE} {SEG}" for c in categories) + " ."
    instances = [(categories.index(o["labels"][0]), mask_at(o["segmentation"], size)) for o in objects]
    return {"task": "generic", "question": QUESTIONS["generic"], "answer": answer, "masks": [],
            "categories": categories, "instances": instances}  # fmt: skip


def sample_frames(available: list[int], t: int, rng: random.Random) -> list[int]:
    """t frame indices spread over `available` (sorted) with a random phase; repeats when too few."""
    if len(available) <= t:
        return [available[round(i * (len(available) - 1) / max(t - 1, 1))] for i in range(t)]
    stride = len(available) / t
    offset = rng.uniform(0, stride)
    return [available[min(int(offset + i * stride), len(available) - 1)] for i in range(t)]


def video_targets(record: dict, task: str, rng: random.Random) -> list[tuple[str, dict]]:
    """(text, track) pairs: each expression (object- or video-level, picked by rng) for video_referring,
    each track with a `<region>` slot for video_object."""
    tracks = {tr["track_id"]: tr for tr in record.get("tracks", []) if tr.get("masklet")}
    if task == "video_object":
        return [(REGION, tracks[k]) for k in sorted(tracks)]
    out = []
    for e in record.get("expressions", []):
        texts = [e[k] for k in ("object_level", "video_level") if e.get(k)]
        if e.get("track_id") in tracks and texts:
            out.append((rng.choice(texts), tracks[e["track_id"]]))
    return out


def video_rows(frames: Clip, targets: list[tuple[str, dict]], rng: random.Random, size: int,
               task: str, num_frames: int) -> list[dict]:  # fmt: skip
    """Rows of one clip: `num_frames` frames sampled over the first target's track, every target's mask on
    those frames (empty where its track has none)."""
    span = targets[0][1]  # the first target's track, first to last visible frame
    first = masklet_by_frame(span)
    available = [
        f for f in sorted(first) if span["first_frame"] <= f <= span["last_frame"] and f < len(frames)
    ]
    if not available:
        return []
    idx = sample_frames(available, num_frames, rng)
    clip = frames.take(idx)
    rows = []
    for text, track in targets:
        m = masklet_by_frame(track)
        masks = [mask_at(m[i], size) if i in m else np.zeros((size, size), bool) for i in idx]
        row = {"task": task, "question": QUESTIONS[task].format(text), "answer": ANSWER, "masks": [masks],
               "frames": clip, "frame_index": idx}  # fmt: skip
        if task == "video_object":
            if not masks[0].any():
                continue
            kind = rng.choice(PROMPT_TYPES)
            row["region"] = (draw_prompt(masks[0], kind, rng), PROMPT_TYPES.index(kind), 0)
        rows.append(row)
    return rows


def make_samples(record: dict, frames: list[np.ndarray] | Clip, task: str, rng: random.Random, cfg: DataConfig,
                 size: int) -> list[dict]:  # fmt: skip
    """The rows one record gives a task: several for referring tasks (sharing its frames), else one."""
    if task in VIDEO_TASKS:
        targets = video_targets(record, task, rng)
        k = cfg.targets_per_record if task == "video_referring" else 1
        return video_rows(
            frames, rng.sample(targets, min(k, len(targets))), rng, size, task, cfg.video_frames
        )
    if task == "referring":
        rows = referring_samples(record, rng, size, cfg.targets_per_record)
    elif task == "semantic":
        grey = chance(rng, cfg.semantic_grayscale)
        rows = semantic_samples(record, rng, size, cfg.targets_per_record, attribute_free=grey,
                                attributes=cfg.semantic_attributes and not grey)  # fmt: skip
        if grey:
            hue = chance(rng, cfg.semantic_hue)
            frames = [rotate_hue(f, rng.randrange(1, 256)) if hue else to_grayscale(f) for f in frames[:1]]
    else:
        make = {"gcg": gcg_sample, "generic": generic_sample}.get(task)
        row = make(record, rng, size) if make else prompt_sample(record, rng, size, task)
        rows = [row] if row else []
    image = frames[:1]
    for row in rows:
        row["frames"] = image  # one list object: collate encodes it once
    return rows


def choose_task(record: dict, weights: dict[str, float], rng: random.Random) -> str | None:
    tasks = VIDEO_TASKS if record["media"]["type"] == "video" else IMAGE_TASKS
    tasks = [t for t in tasks if weights.get(t, 0) > 0]
    return rng.choices(tasks, [weights[t] for t in tasks])[0] if tasks else None
