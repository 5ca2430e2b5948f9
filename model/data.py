"""Shards -> task samples -> batches.

Reading: each source is an engine output dir; its committed index names the shards. Training streams
them with webdataset: shards resampled with a seed per (rank, worker) (webdataset's node and worker
split for resampled data), so every rank gets an endless stream and takes the same number of batches
(`WebLoader.with_epoch`). Evaluation reads every shard once, split by node and worker.

Tasks (X2SAM's image and video tasks), chosen per record with the configured weights among the tasks
its annotations support:
  referring        referring_expressions[i]            "please segment {expr} ." -> "it is [SEG] ."
  gcg              gcg / dense_caption spans            "... grounded caption ." -> "<p> a red circle </p> [SEG] ..."
  interactive      a visual prompt drawn from a mask    "please segment <region> ." -> "it is [SEG] ."
  vgd              same, target: all same-label objects
  video_referring  expressions[i] + track masklet       over T frames (sparse-dense sampling)
  video_object     a first-frame mask prompt + masklet
Batches hold one modality (X2SAM's source-grouped batching), so every sample in a batch has T frames.
Referring tasks ask up to `targets_per_record` questions of one record (LISA's num_classes_per_sample):
those rows share one encoded image or clip, and the same pixels asked for different words are what
teaches the [SEG] state to depend on the words rather than on "any object".
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import Tensor
from torch.utils.data import IterableDataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from groundmill.model.config import DataConfig, SourceConfig, TrainConfig
from groundmill.model.modeling import P_CLOSE, P_OPEN, PROMPT_TYPES, REGION, SEG, SPECIAL_TOKENS
from groundmill.pipeline.sink import read_index
from groundmill.schema import STATUS_OK, decode_mask

IMAGE_TASKS = ("referring", "gcg", "interactive", "vgd")
VIDEO_TASKS = ("video_referring", "video_object")
QUESTIONS = {
    "referring": "please segment {} .",
    "gcg": "please give a grounded caption of the image .",
    "interactive": "please segment {} .",
    "vgd": "please segment everything like {} .",
    "video_referring": "please segment {} in the video .",
    "video_object": "please track {} in the video .",
}
ANSWER = f"it is {SEG} ."
MAX_BARREN_RECORDS = 1000

# ---------------------------------------------------------------------------------------------------------
# Shards and records.


def shard_urls(source: str | Path) -> list[str]:
    """The committed shards of an engine output dir (rows with status ok and a shard)."""
    table = read_index(source, columns=["shard", "status"]).to_pylist()
    shards = sorted({r["shard"] for r in table if r["status"] == STATUS_OK and r["shard"]})
    if not shards:
        raise FileNotFoundError(f"no committed shards under {source}")
    return [str(Path(source) / s) for s in shards]


def decode_video(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def load(sample: dict[str, Any], size: int) -> tuple[dict, list[np.ndarray]]:
    """A webdataset sample -> (record, frames resized to size x size); one frame for an image."""
    record = json.loads(sample["json"])
    data = sample[record["media"]["ext"]]
    if record["media"]["type"] == "video":
        frames = decode_video(data)
    else:
        frames = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))]
    frames = [
        f if f.shape[:2] == (size, size) else np.asarray(Image.fromarray(f).resize((size, size)))
        for f in frames
    ]
    return record, frames


def mask_at(rle: dict, size: int) -> np.ndarray:
    m = decode_mask(rle)
    if m.shape != (size, size):
        m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
    return m


def record_texts(record: dict) -> list[str]:
    """Every text a record can contribute to samples (for building the tiny word-level vocabulary)."""
    texts = [r["expression"] for r in record.get("referring_expressions", [])]
    texts += [record[k]["caption"] for k in ("gcg", "dense_caption") if k in record]
    for e in record.get("expressions", []):
        texts += [v for k, v in e.items() if k != "track_id" and isinstance(v, str)]
    return texts


# ---------------------------------------------------------------------------------------------------------
# Tokenizer.


def build_word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over `texts` + the task templates + the special tokens."""
    base = ["[PAD]", "[UNK]", "[EOS]", *SPECIAL_TOKENS]
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in [*texts, *QUESTIONS.values(), ANSWER]:
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()) if w not in base)
    vocab = {w: i for i, w in enumerate(base + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        additional_special_tokens=SPECIAL_TOKENS,
    )


def make_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """Tiny LLM: a word-level vocabulary from the first records of the training sources. Otherwise the
    LLM's own tokenizer with the special tokens added."""
    if cfg.llm.name != "tiny":
        tok = AutoTokenizer.from_pretrained(cfg.llm.name)
        tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    texts: list[str] = []
    for source in cfg.data.train:
        for n, sample in enumerate(wds.WebDataset(shard_urls(source.path), shardshuffle=False)):
            if n >= cfg.data.tokenizer_records:
                break
            texts += record_texts(json.loads(sample["json"]))
    return build_word_tokenizer(texts)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# Record -> task sample. A sample: question, answer, frames (T,S,S,3), masks (Q,T,S,S) in [SEG] order,
# optional region (map, type, frame).


def _objects_with_masks(frame: dict) -> list[dict]:
    return [o for o in frame.get("objects", []) if o.get("segmentation")]


def referring_targets(record: dict, size: int) -> list[tuple[str, np.ndarray]]:
    """(expression, target mask) for every referring expression whose object has a mask."""
    by_id = {o["id"]: o for o in _objects_with_masks(record)}
    refs = [r for r in record.get("referring_expressions", []) if r.get("object_id") in by_id]
    return [(r["expression"], mask_at(by_id[r["object_id"]]["segmentation"], size)) for r in refs]


def referring_samples(record: dict, rng: random.Random, size: int, k: int) -> list[dict]:
    """Up to k referring rows of one image, distinct targets."""
    targets = referring_targets(record, size)
    return [
        {
            "task": "referring",
            "question": QUESTIONS["referring"].format(expr),
            "answer": ANSWER,
            "masks": [[mask]],
        }
        for expr, mask in rng.sample(targets, min(k, len(targets)))
    ]


def gcg_phrases(record: dict, size: int) -> tuple[str, list[tuple[int, int]], list[np.ndarray]] | None:
    """(caption, phrase spans, phrase masks) from the GCG form, else from the dense caption's details."""
    if record.get("gcg", {}).get("groundings"):
        g = record["gcg"]
        items = [(v["token_positives"], v["rle_masks"]) for v in g["groundings"].values()]
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


def video_rows(frames: list[np.ndarray], targets: list[tuple[str, dict]], rng: random.Random, size: int,
               task: str, num_frames: int) -> list[dict]:  # fmt: skip
    """Rows of one clip: `num_frames` frames sampled over the first target's track, every target's mask on
    those frames (empty where its track has none)."""
    first = targets[0][1]["masklet"]
    available = sorted(int(k) for k in first if int(k) < len(frames))
    if not available:
        return []
    idx = sample_frames(available, num_frames, rng)
    clip = [frames[i] for i in idx]
    rows = []
    for text, track in targets:
        m = track["masklet"]
        masks = [mask_at(m[str(i)], size) if str(i) in m else np.zeros((size, size), bool) for i in idx]
        row = {"task": task, "question": QUESTIONS[task].format(text), "answer": ANSWER, "masks": [masks],
               "frames": clip, "frame_index": idx}  # fmt: skip
        if task == "video_object":
            if not masks[0].any():
                continue
            kind = rng.choice(PROMPT_TYPES)
            row["region"] = (draw_prompt(masks[0], kind, rng), PROMPT_TYPES.index(kind), 0)
        rows.append(row)
    return rows


def make_samples(record: dict, frames: list[np.ndarray], task: str, rng: random.Random, cfg: DataConfig,
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
    else:
        row = gcg_sample(record, rng, size) if task == "gcg" else prompt_sample(record, rng, size, task)
        rows = [row] if row else []
    image = frames[:1]
    for row in rows:
        row["frames"] = image  # one list object: collate encodes it once
    return rows


def choose_task(record: dict, weights: dict[str, float], rng: random.Random) -> str | None:
    tasks = VIDEO_TASKS if record["media"]["type"] == "video" else IMAGE_TASKS
    tasks = [t for t in tasks if weights.get(t, 0) > 0]
    return rng.choices(tasks, [weights[t] for t in tasks])[0] if tasks else None


# ---------------------------------------------------------------------------------------------------------
# Collation.


def encode_text(tok: PreTrainedTokenizerBase, question: str, answer: str, max_len: int) -> tuple[list, list]:
    """Token ids of question + answer + eos, and LM labels (-100 on the question)."""
    q = tok(question, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (q + a)[:max_len]
    return ids, ([-100] * len(q) + a)[:max_len]


def collate(samples: list[dict], tok: PreTrainedTokenizerBase, max_len: int) -> dict[str, Tensor]:
    """Samples of one modality -> a padded batch; masks in row-major [SEG] order (truncated [SEG]s dropped).
    Rows whose "frames" are the same list object share one entry of `frames`; `row_frames` maps each row
    to its entry, so a shared image is encoded once."""
    seg_id = tok.convert_tokens_to_ids(SEG)
    encoded = [encode_text(tok, s["question"], s["answer"], max_len) for s in samples]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(samples), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    masks, regions, types, owners = [], [], [], []
    for b, ((ids, lab), s) in enumerate(zip(encoded, samples, strict=True)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention[b, : len(ids)] = 1
        masks += s["masks"][: ids.count(seg_id)]
        if "region" in s:
            regions.append(torch.from_numpy(s["region"][0]))
            types.append(s["region"][1])
            owners.append([b, s["region"][2]])
    entry: dict[int, int] = {}  # id of a frames list -> its index in `frames`
    row_frames = [entry.setdefault(id(s["frames"]), len(entry)) for s in samples]
    clips = {id(s["frames"]): s["frames"] for s in samples}  # insertion order = entry order
    frames = torch.from_numpy(np.stack([np.stack(c) for c in clips.values()])).permute(0, 1, 4, 2, 3)
    batch = {
        "frames": frames.contiguous(),
        "row_frames": torch.tensor(row_frames),
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "masks": torch.from_numpy(np.array(masks, dtype=np.float32)),
    }
    if regions:
        batch.update(
            region_maps=torch.stack(regions),
            region_types=torch.tensor(types),
            region_owner=torch.tensor(owners),
        )
    return batch


# ---------------------------------------------------------------------------------------------------------
# Streams.


def record_stream(urls: list[str], seed: int) -> Iterator[dict]:
    """Endless resampled samples of one source; the shard order is seeded per rank and worker."""
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(200, initial=50, rng=random.Random(seed)),
    )
    return iter(pipeline)


class TaskBatches(IterableDataset):
    """Endless batches mixed over sources (weights) and tasks (weights), grouped by modality."""

    def __init__(self, cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.cfg, self.tok = cfg, tokenizer
        self.urls = [shard_urls(s.path) for s in cfg.data.train]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        d, size = self.cfg.data, self.cfg.vision.image_size
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(self.cfg.seed * 1_000_003 + rank * 1000 + worker)
        streams = [record_stream(u, self.cfg.seed + i) for i, u in enumerate(self.urls)]
        weights = [s.weight for s in d.train]
        buffers: dict[str, list[dict]] = {"image": [], "video": []}
        barren = 0  # records in a row that gave no rows
        while True:
            src = rng.choices(range(len(streams)), weights)[0]
            record, frames = load(next(streams[src]), size)
            task = choose_task(record, d.tasks, rng)
            rows = make_samples(record, frames, task, rng, d, size) if task else []
            barren = 0 if rows else barren + 1
            if barren >= MAX_BARREN_RECORDS:  # an endless stream would otherwise spin for ever
                raise ValueError(
                    f"{barren} records in a row of data.train {[s.path for s in d.train]} gave no sample for "
                    f"the tasks weighted in data.tasks: the records lack the annotations those tasks need "
                    "(objects with masks, referring_expressions, gcg / dense_caption, tracks, expressions)"
                )
            kind = record["media"]["type"]
            buffers[kind] += rows
            # A record's rows stay together, so a batch may run over its size by up to k-1 rows.
            if len(buffers[kind]) >= (d.video_batch_size if kind == "video" else d.batch_size):
                yield collate(buffers[kind], self.tok, d.max_text_tokens)
                buffers[kind] = []


def train_loader(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, num_batches: int) -> wds.WebLoader:
    """Exactly `num_batches` batches on every rank (equal steps, so DDP never waits on a missing rank)."""
    loader = wds.WebLoader(TaskBatches(cfg, tokenizer), batch_size=None, num_workers=cfg.data.num_workers)
    return loader.with_epoch(num_batches)


def eval_records(sources: list[SourceConfig], size: int) -> Iterator[tuple[dict, list[np.ndarray]]]:
    """Every sample of the sources once, in shard order, split by node and worker."""
    for source in sources:
        ds = wds.WebDataset(
            shard_urls(source.path),
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
        )
        for sample in ds:
            yield load(sample, size)
