"""Task samples -> batches, and the endless mixed training stream.

Training streams each source's shards (:mod:`groundmill.model.records`) with webdataset: shards
resampled with a seed per (rank, worker) (webdataset's node and worker split for resampled data), so
every rank gets an endless stream and takes the same number of batches (`WebLoader.with_epoch`).
Records become task rows (:mod:`groundmill.model.tasks`); batches hold one modality (X2SAM's
source-grouped batching), so every sample in a batch has T frames. Rows of one record share one
encoded image or clip: the same pixels asked for different words are what teaches the [SEG] state to
depend on the words rather than on "any object".
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase

from groundmill.model.config import TrainConfig
from groundmill.model.modeling import SEG
from groundmill.model.records import load, shard_urls
from groundmill.model.tasks import choose_task, make_samples

MAX_BARREN_RECORDS = 1000


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
