"""The trainer's processor: the MLLM's own with the special tokens added, or, for a tiny MLLM with a random
language half, one over a word-level vocabulary built from the first records of the training sources."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, ProcessorMixin

from groundmill.model.config import TrainConfig
from groundmill.model.mllm import IMAGE_TOKEN, SPECIAL_TOKENS, make_processor
from groundmill.model.records import record_texts, shard_urls
from groundmill.model.tasks import ANSWER, NO_TARGET_ANSWER, QUESTIONS
from groundmill.shards import iter_shard


def build_word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over `texts` + the task templates + the special tokens."""
    base = ["[PAD]", "[UNK]", "[EOS]", *SPECIAL_TOKENS, IMAGE_TOKEN]
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in [*texts, *QUESTIONS.values(), ANSWER, NO_TARGET_ANSWER]:
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
        additional_special_tokens=[*SPECIAL_TOKENS, IMAGE_TOKEN],
    )


def vocabulary_records(urls: list[str], limit: int) -> Iterator[dict[str, bytes]]:
    """About `limit` records spread over the shards: an equal share from the start of each (of the first
    `limit` shards). Shards hold one media type and task each, so a vocabulary from the first records in
    order would miss whole kinds: the video expressions' words ("moving up") after the image shards."""
    share = -(-limit // max(len(urls), 1))
    for url in urls[:limit]:
        for _, files in itertools.islice(iter_shard(url), share):
            yield files


def trainer_processor(cfg: TrainConfig) -> ProcessorMixin:
    """The MLLM's processor; a tiny MLLM with a random language half gets a word-level vocabulary from
    records spread over the training sources' shards (vocabulary_records)."""
    c = cfg.mllm
    if c.name != "tiny" or c.language:
        return make_processor(c)
    texts: list[str] = []
    for source in cfg.data.train:  # the same records on every rank: the same vocabulary
        for files in vocabulary_records(shard_urls(source.path), cfg.data.tokenizer_records):
            texts += record_texts(json.loads(files["json"]))
    return make_processor(c, build_word_tokenizer(texts))
