"""A checkpoint's predictions: teacher-forced mask logits for task samples, and greedy GCG captions with
the mask logits of their [SEG]s. Shared by the shard eval (model/eval.py) and the benchmark layouts
(model/eval_bench.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from groundmill.model.config import TrainConfig
from groundmill.model.data import collate
from groundmill.model.mllm import load_processor
from groundmill.model.modeling import P_CLOSE, P_OPEN, SEG, X2SamModel, continued
from groundmill.model.tasks import ANSWER, NO_TARGET_ANSWER
from groundmill.model.train import build_model, load_checkpoint


def load_for_eval(cfg: TrainConfig, ckpt: str | Path) -> tuple[X2SamModel, ProcessorMixin]:
    processor = load_processor(ckpt)
    model = build_model(cfg, processor)
    load_checkpoint(Path(ckpt), model)
    return model.eval(), processor


def predict(model: X2SamModel, samples: list[dict], processor: ProcessorMixin, cfg: TrainConfig,
            device: torch.device) -> list[np.ndarray]:  # fmt: skip
    """Teacher-forced mask logits for task samples: one float (Q,T,S,S) array per sample."""
    return [masks for masks, _ in predict_present(model, samples, processor, cfg, device)]


def presence(logits: Tensor, labels: Tensor, tok: PreTrainedTokenizerBase) -> list[float]:
    """Per row, the probability that the model answers as if its text were there ("it is [SEG]") rather
    than "there is none" (model/tasks.py NO_TARGET_ANSWER, trained on hard negatives: GRES's no-target
    expressions): the two answers' first tokens, compared where the answer starts."""
    yes, no = (tok(a, add_special_tokens=False)["input_ids"][0] for a in (ANSWER, NO_TARGET_ANSWER))
    start = (labels != -100).int().argmax(1)  # the first answer token of each row
    at = logits[torch.arange(len(labels)), start - 1]  # the logits that predict it
    return at[:, [yes, no]].float().softmax(-1)[:, 0].tolist()


@torch.no_grad()
def predict_present(model: X2SamModel, samples: list[dict], processor: ProcessorMixin, cfg: TrainConfig,
                    device: torch.device) -> list[tuple[np.ndarray, float]]:  # fmt: skip
    """Teacher-forced mask logits for task samples, one float (Q,T,S,S) array per sample, each with the
    model's presence probability (`presence`). A batch holds one frame count, in the training batch size
    of its modality."""
    out: list[tuple[np.ndarray, float] | None] = [None] * len(samples)
    by_frames: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_frames[len(s["frames"])].append(i)
    for frames, idx in by_frames.items():
        bs = cfg.data.video_batch_size if frames > 1 else cfg.data.batch_size
        for start in range(0, len(idx), bs):
            chunk = idx[start : start + bs]
            rows = [samples[i] for i in chunk]
            batch = collate(rows, processor, model.slots)
            batch = {k: v.to(device) for k, v in batch.items()}
            result = model(batch)
            masks = result["mask_logits"].float().cpu().numpy()
            present = presence(result["logits"], batch["labels"], processor.tokenizer)
            counts = (batch["input_ids"] == model.seg_id).sum(1).tolist()
            for i, m, p in zip(chunk, np.split(masks, np.cumsum(counts)[:-1]), present, strict=True):
                out[i] = (m, p)
    return out


def parse_gcg(tok: PreTrainedTokenizerBase, ids: list[int]) -> tuple[str, list[str]]:
    """Generated answer ids -> (plain caption, phrase before each [SEG])."""
    words, phrases, current, inside = [], [], [], False
    for t in tok.convert_ids_to_tokens(ids):
        if t == P_OPEN:
            inside, current = True, []
        elif t == P_CLOSE:
            inside = False
        elif t == SEG:
            phrases.append(" ".join(current))
        elif t not in tok.all_special_tokens:
            words.append(t)
            if inside:
                current.append(t)
    return " ".join(words), phrases


@torch.no_grad()
def gcg_predict(model: X2SamModel, sample: dict, processor: ProcessorMixin, device: torch.device,
                max_new_tokens: int) -> tuple[str, list[str], np.ndarray]:  # fmt: skip
    """Greedy caption with its [SEG]s, then the (n, S, S) mask logits of those [SEG]s."""
    batch = {k: v.to(device) for k, v in collate([{**sample, "answer": ""}], processor, model.slots).items()}
    prompt = batch["input_ids"]  # an empty answer has no eos to drop
    ids = model.generate(batch, max_new_tokens, processor.tokenizer.eos_token_id)
    caption, phrases = parse_gcg(processor.tokenizer, ids[0, prompt.shape[1] :].tolist())
    size = batch["frames"].shape[-1]
    if not phrases:
        return caption, [], np.zeros((0, size, size), np.float32)
    return caption, phrases, model(continued(batch, ids))["mask_logits"][:, 0].float().cpu().numpy()
