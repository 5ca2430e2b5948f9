"""LLM backends behind one interface (see `base` for the contract), plus prompt rendering.

from groundmill.stages.llm import LLMConfig, SamplingParams, make_backend
backend = make_backend(LLMConfig(backend="http", base_url="http://127.0.0.1:8000/v1"), "smollm2")
backend.setup()
[g.text for g in backend.generate(["Say hi."], SamplingParams(max_new_tokens=16))]
"""

from __future__ import annotations

from groundmill.stages.llm.base import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Checked,
    Generation,
    LLMBackend,
    LLMConfig,
    LLMUnavailable,
    Message,
    Prompt,
    SamplingParams,
    generate_checked,
    require_stop,
)

BACKENDS = ("transformers", "http", "vllm")


def make_backend(
    config: LLMConfig, model_id: str, device: str = "auto", dtype: str = "float32", seed: int = 0
) -> LLMBackend:
    """The backend named by `config.backend` (not yet set up: call `setup()` once per actor)."""
    if config.backend == "transformers":
        from groundmill.stages.llm.hf import TransformersBackend

        return TransformersBackend(config, model_id, device, dtype, seed=seed)
    if config.backend == "http":
        from groundmill.stages.llm.http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(config, model_id, device, dtype)
    if config.backend == "vllm":
        from groundmill.stages.llm.vllm import RayVLLMBackend

        return RayVLLMBackend(config, model_id, device, dtype)
    raise LLMUnavailable(f"unknown LLM backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Checked",
    "Generation",
    "LLMBackend",
    "LLMConfig",
    "LLMUnavailable",
    "Message",
    "Prompt",
    "SamplingParams",
    "generate_checked",
    "make_backend",
    "require_stop",
]
