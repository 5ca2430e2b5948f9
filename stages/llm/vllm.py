"""vLLM in-process, one engine per Ray actor (GPU clusters; `pip install 'groundmill[vllm]'`).

The LLM stages run as actor pools; each actor's `setup` builds this backend's engine once
(`vllm.LLM` on the actor's GPU), and every batch goes through that engine's `chat`, which batches
the prompts itself (continuous batching). Nothing is started per batch. For tensor parallelism
beyond one GPU, serve the model with `vllm serve` and use the `http` backend.
"""

from __future__ import annotations

from typing import Any, Protocol

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
from groundmill.stages.llm.hf import resolve_checkpoint

FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}


class Engine(Protocol):
    def chat(self, conversations: list[list[dict]], sampling: dict[str, Any]) -> list[tuple[str, str, int]]:
        """(text, vLLM finish reason, generated tokens) per conversation, in order."""
        ...


class VLLMEngine:
    """`vllm.LLM` behind the `Engine` protocol."""

    def __init__(self, model_id: str, engine_kwargs: dict[str, Any]):
        try:
            from vllm import LLM
        except ImportError:
            raise LLMUnavailable(
                "llm.backend 'vllm' needs vLLM, which is not installed: pip install 'groundmill[vllm]' "
                "(GPU machines), or use llm.backend 'transformers' or 'http'"
            ) from None
        self.llm = LLM(model=resolve_checkpoint(model_id), **engine_kwargs)

    def chat(self, conversations: list[list[dict]], sampling: dict[str, Any]) -> list[tuple[str, str, int]]:
        from vllm import SamplingParams as VLLMSampling

        outs = self.llm.chat(conversations, VLLMSampling(**sampling), use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in outs]


def build_engine(model_id: str, engine_kwargs: dict[str, Any]) -> Engine:
    """The engine of one actor (a test may stand in a counting double here)."""
    return VLLMEngine(model_id, engine_kwargs)


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> vLLM's SamplingParams arguments."""
    out: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature}
    out["top_p"] = params.top_p
    if params.stop:
        out["stop"] = list(params.stop)
    if params.seed is not None:
        out["seed"] = params.seed
    return out


class RayVLLMBackend(LLMBackend):
    name = "vllm"

    def setup(self) -> None:
        engine_kwargs = {"dtype": self.dtype, **self.config.engine_kwargs}
        self.engine = build_engine(self.model_id, engine_kwargs)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        outputs = self.engine.chat([as_messages(p) for p in prompts], sampling_dict(params))
        return [
            Generation(
                text,
                FINISH_REASONS.get(reason, FINISH_ERROR),
                tokens,
                error="" if reason in FINISH_REASONS else f"vLLM finish reason {reason!r}",
            )
            for text, reason, tokens in outputs
        ]
