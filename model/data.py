"""Task samples -> batches, and the endless mixed training stream.

Training streams each source's shards (:mod:`groundmill.model.records`) as seeded shard visits per
(rank, worker), so every rank gets an endless stream, takes the same number of batches
(`WebLoader.with_epoch`) and can resume from a stored position (`TaskBatches`). Records become task rows (:mod:`groundmill.model.tasks`); batches hold one modality (X2SAM's
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
from transformers import ProcessorMixin

from groundmill.model.config import TrainConfig
from groundmill.model.modeling import FRAME, SAM2, SEG, PromptSlots
from groundmill.model.records import ShardCache, ShardReader, load, shard_urls
from groundmill.model.tasks import choose_task, make_samples

MAX_BARREN_RECORDS = 1000


def prompt_text(processor: ProcessorMixin, question: str, images: int, sparse: int, sam2: int = 0) -> str:
    """The question with its image placeholders (through the processor's chat template when it has one),
    `sam2` `<sam2>` slots and one `<frame>` slot per sparse video frame."""
    text = SAM2 * sam2 + FRAME * sparse + (" " if sam2 or sparse else "") + question
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    return processor.image_token * images + " " + text


def row_texts(s: dict, processor: ProcessorMixin, slots: PromptSlots) -> tuple[str, list[np.ndarray], str]:
    """A sample's (prompt, the frames the VLM sees in full, answer + eos)."""
    t = len(s["frames"])
    images = [s["frames"][i] for i in slots.dense_picks(t)]
    answer = f" {s['answer']}{processor.tokenizer.eos_token}" if s["answer"] else ""
    prompt = prompt_text(
        processor, s["question"], len(images), len(slots.sparse_picks(t)), slots.sam2_tokens(t)
    )
    return prompt, images, answer


IMAGE_SLOTS = PromptSlots()  # one dense frame, no <sam2> tokens


def collate(
    samples: list[dict], processor: ProcessorMixin, slots: PromptSlots = IMAGE_SLOTS
) -> dict[str, Tensor]:
    """Samples of one modality -> a padded batch; masks in row-major [SEG] order. The VLM's processor
    makes its inputs (`mllm.*` keys: pixel values and the like). LM labels: the answer tokens only.
    Rows whose "frames" are the same list object share one entry of `frames`; `row_frames` maps each row
    to its entry, so a shared image is encoded once by SAM2."""
    tok = processor.tokenizer
    prompts, images, answers = zip(*(row_texts(s, processor, slots) for s in samples), strict=True)
    # Right padding whatever the saved processor says (Qwen2-VL's and batch-generation setups pad left):
    # the labels below sit at the end of each row's real tokens.
    enc = processor(text=[p + a for p, a in zip(prompts, answers, strict=True)], images=list(images),
                    return_tensors="pt", padding=True, padding_side="right")  # fmt: skip
    input_ids, attention = enc.pop("input_ids"), enc.pop("attention_mask")
    labels = torch.full_like(input_ids, -100)
    for b, answer in enumerate(answers):
        n = len(tok(answer, add_special_tokens=False)["input_ids"]) if answer else 0
        end = int(attention[b].sum())  # right padding
        labels[b, end - n : end] = input_ids[b, end - n : end]
    seg_id = tok.convert_tokens_to_ids(SEG)
    masks, regions, types, owners = [], [], [], []
    instances, classes, instance_rows = [], [], []  # generic rows' instances (model/generic.py)
    generic = [b for b, s in enumerate(samples) if "instances" in s]
    for b, s in enumerate(samples):
        masks += s["masks"][: int((input_ids[b] == seg_id).sum())]
        for c, m in s.get("instances", []):
            instances.append(m)
            classes.append(c)
            instance_rows.append(generic.index(b))
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
        **{f"mllm.{k}": v for k, v in enc.items() if isinstance(v, Tensor)},
    }
    if generic:
        batch.update(
            generic_rows=torch.tensor([b in generic for b in range(len(samples))]),
            instance_masks=torch.from_numpy(np.array(instances, dtype=np.float32)).reshape(
                -1, *frames.shape[-2:]
            ),
            instance_class=torch.tensor(classes, dtype=torch.long),
            instance_row=torch.tensor(instance_rows, dtype=torch.long),
        )
    if regions:
        batch.update(
            region_maps=torch.stack(regions),
            region_types=torch.tensor(types),
            region_owner=torch.tensor(owners),
        )
    return batch


# ---------------------------------------------------------------------------------------------------------
# The stream.


class TaskBatches(IterableDataset):
    """Endless batches mixed over sources (weights) and tasks (weights), grouped by modality, each batch
    carrying the stream position to resume from (`position`).

    Stream `s` of rank `r` is a sequence of shard visits: visit k draws a source (weights) and one of its
    shards with an rng seeded by (seed, r, s, k), and reads that shard's samples in a shuffled order;
    record j of visit k makes its rows with an rng seeded by (seed, r, s, k, j). A batch is thus a pure
    function of its records' positions, and resuming needs only the next position and the positions of the
    records whose rows still wait in a buffer, not a replay of every consumed batch. Streams are the
    DataLoader's workers; `consumed` batches rotate them, as its round robin restarts at worker 0."""

    def __init__(self, cfg: TrainConfig, processor: ProcessorMixin, start: dict[str, dict] | None = None,
                 consumed: int = 0):  # fmt: skip
        super().__init__()
        self.cfg, self.processor = cfg, processor
        self.slots = PromptSlots.of(cfg)
        self.start, self.consumed = start or {}, consumed
        self.urls = [shard_urls(s.path) for s in cfg.data.train]
        self.shards = ShardCache()

    def visit(self, base: str, k: int) -> tuple[ShardReader, list[str]]:
        rng = random.Random(f"{base}/{k}")
        src = rng.choices(range(len(self.urls)), [s.weight for s in self.cfg.data.train])[0]
        reader = self.shards(rng.choice(self.urls[src]))
        keys = list(reader.keys)
        rng.shuffle(keys)
        return reader, keys

    def rows(self, base: str, k: int, j: int) -> tuple[str, list[dict]]:
        """(modality, task rows) of record j of visit k."""
        reader, keys = self.visit(base, k)
        record, frames = load(reader.sample(keys[j]), self.cfg.vision.image_size)
        rng = random.Random(f"{base}/{k}/{j}")
        task = choose_task(record, self.cfg.data.tasks, rng)
        rows = (
            make_samples(record, frames, task, rng, self.cfg.data, self.cfg.vision.image_size) if task else []
        )
        return record["media"]["type"], rows

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        d = self.cfg.data
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        stream = (worker + self.consumed) % workers
        base = f"{self.cfg.seed}/{rank}/{stream}"
        pos = self.start.get(str(stream), {"next": [0, 0], "pending": {}})
        buffers: dict[str, list[dict]] = {"image": [], "video": []}
        owners: dict[str, list[list[int]]] = {"image": [], "video": []}  # positions of the buffered records
        for kind, positions in pos["pending"].items():
            for k, j in positions:
                buffers[kind] += self.rows(base, k, j)[1]
                owners[kind].append([k, j])
        k, first = pos["next"]
        barren = 0  # records in a row that gave no rows
        while True:
            n_keys = len(self.visit(base, k)[1])
            for j in range(first, n_keys):
                kind, rows = self.rows(base, k, j)
                barren = 0 if rows else barren + 1
                if barren >= MAX_BARREN_RECORDS:  # an endless stream would otherwise spin for ever
                    raise ValueError(
                        f"{barren} records in a row of data.train {[s.path for s in d.train]} gave no sample "
                        "for the tasks weighted in data.tasks: the records lack the annotations those tasks "
                        "need (objects with masks, referring_expressions, gcg / dense_caption, tracks, expressions)"
                    )
                if not rows:
                    continue
                buffers[kind] += rows
                owners[kind].append([k, j])
                # A record's rows stay together, so a batch may run over its size by up to k-1 rows.
                if len(buffers[kind]) >= (d.video_batch_size if kind == "video" else d.batch_size):
                    batch = collate(buffers[kind], self.processor, self.slots)
                    buffers[kind], owners[kind] = [], []
                    next_pos = [k, j + 1] if j + 1 < n_keys else [k + 1, 0]
                    pending = {kk: [list(p) for p in v] for kk, v in owners.items() if v}
                    yield {**batch, "position": {"stream": stream, "next": next_pos, "pending": pending}}
            k, first = k + 1, 0


def train_loader(cfg: TrainConfig, processor: ProcessorMixin, num_batches: int, start: dict[str, dict] | None = None,
                 consumed: int = 0) -> wds.WebLoader:  # fmt: skip
    """Exactly `num_batches` batches on every rank (equal steps, so DDP never waits on a missing rank,
    whatever each rank's shards), from the stream positions `start` after `consumed` batches."""
    batches = TaskBatches(cfg, processor, start, consumed)
    loader = wds.WebLoader(batches, batch_size=None, num_workers=cfg.data.num_workers)
    return loader.with_epoch(num_batches)
