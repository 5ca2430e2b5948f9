"""The trainer's tokenizer: the LLM's own with the special tokens added, or, for the tiny LLM, a
word-level vocabulary built from the first records of the training sources."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from groundmill.model.config import TrainConfig
from groundmill.model.modeling import SPECIAL_TOKENS
from groundmill.model.records import record_texts, shard_urls
from groundmill.model.tasks import ANSWER, QUESTIONS


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
