"""vLLM inside Ray Data through `ray.data.llm` (GPU clusters; `pip install 'groundmill[vllm]'`).

`processor(params)` is a `ray.data.llm` Processor: apply it to any Dataset with a `messages` column
to run vLLM engine actors as part of a Ray Data pipeline. `generate` runs one batch of prompts
through it, so stages use this backend exactly like the others.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from groundmill.stages.llm.base import (
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


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> vLLM's sampling_params mapping."""
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
        if importlib.util.find_spec("vllm") is None:
            raise LLMUnavailable(
                "llm.backend 'vllm' needs vLLM, which is not installed: pip install 'groundmill[vllm]' "
                "(GPU machines), or use llm.backend 'transformers' or 'http'"
            )
        from ray.data.llm import vLLMEngineProcessorConfig

        engine_kwargs = {"dtype": self.dtype, **self.config.engine_kwargs}
        self.processor_config = vLLMEngineProcessorConfig(
            model_source=resolve_checkpoint(self.model_id),
            engine_kwargs=engine_kwargs,
            batch_size=self.config.batch_size,
            concurrency=1,
        )

    def processor(self, params: SamplingParams) -> Any:
        from ray.data.llm import build_processor

        sampling = sampling_dict(params)
        return build_processor(
            self.processor_config,
            preprocess=lambda row: {"messages": row["messages"], "sampling_params": sampling},
            postprocess=lambda row: {
                "index": row["index"],
                "text": row["generated_text"],
                "tokens": row["num_generated_tokens"],
            },
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        import ray

        if not prompts:
            return []
        ds = ray.data.from_items([{"index": i, "messages": as_messages(p)} for i, p in enumerate(prompts)])
        rows = sorted(self.processor(params)(ds).take_all(), key=lambda r: r["index"])
        # vLLM's batch output carries no finish reason: a generation that used every allowed token
        # was cut, anything shorter ended on EOS or a stop string.
        return [
            Generation(
                r["text"],
                FINISH_LENGTH if r["tokens"] >= params.max_new_tokens else FINISH_STOP,
                int(r["tokens"]),
            )
            for r in rows
        ]
