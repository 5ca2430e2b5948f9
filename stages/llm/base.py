"""The one LLM interface every language stage uses, whatever runs the model.

    backend = make_backend(LLMConfig(backend="transformers"), model_id="smollm2")
    backend.setup()                                   # loads weights / opens the client, once
    gens = backend.generate(prompts, SamplingParams(max_new_tokens=64))
    gens[0].text, gens[0].finish_reason, gens[0].tokens

A prompt is a list of chat messages (``{"role": ..., "content": ...}``) or a plain string (sent as
one user message). Every backend answers with one :class:`Generation` per prompt, in order, and never
raises for one bad prompt: a failed request comes back with ``finish_reason="error"`` so a stage can
retry it (:func:`generate_checked`) and record the failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# content is a string, or (HTTP backend, vision-language servers) a list of OpenAI content parts
Message = dict[str, Any]
Prompt = str | list[Message]

FINISH_STOP = "stop"  # the model ended on its own (EOS or a stop string)
FINISH_LENGTH = "length"  # cut at max_new_tokens: GranD drops these
FINISH_ERROR = "error"  # the request failed (timeout, HTTP error, malformed response)


def as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@dataclass
class SamplingParams:
    # GranD's dense-caption settings (Vicuna on vLLM): temperature 0.7, top_p 0.95, 512 new tokens.
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Generation:
    text: str
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH | FINISH_ERROR
    tokens: int = 0  # generated tokens (0 when unknown or failed)
    error: str = ""

    @property
    def stopped(self) -> bool:
        return self.finish_reason == FINISH_STOP


@dataclass
class LLMConfig:
    """How a stage reaches its LLM (the model itself is the stage's `model.id`)."""

    backend: str = "transformers"  # transformers | http | vllm
    # http: an OpenAI-compatible server root, e.g. http://127.0.0.1:8000/v1
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never from the manifest
    max_concurrency: int = 4  # http: requests in flight at once
    timeout_s: float = 120.0  # http: per request, in all (a server that trickles bytes is cut off)
    max_response_bytes: int = 8 * 2**20  # http: a longer response body is refused
    request_retries: int = 2  # http: transport-level retries (connection errors, 5xx, timeouts)
    batch_size: int = 8  # transformers: prompts per generate() call (vLLM batches on its own)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # vllm: passed to the engine


class LLMUnavailable(RuntimeError):
    """A backend cannot run here (a missing optional dependency, an unknown backend name)."""


class LLMBackend(ABC):
    name: str = ""

    def __init__(self, config: LLMConfig, model_id: str, device: str = "auto", dtype: str = "float32"):
        self.config = config
        self.model_id = model_id
        self.device = device
        self.dtype = dtype

    def setup(self) -> None:  # noqa: B027 - a backend with nothing to load
        """Load weights or open connections; call once per actor."""

    def close(self) -> None:  # noqa: B027 - a backend with nothing to release
        """Release connections and pools."""

    @abstractmethod
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One Generation per prompt, in order; failures come back as finish_reason="error"."""

    def describe(self) -> dict[str, Any]:
        """For provenance: which backend and model produced the text."""
        return {"backend": self.name, "model": self.model_id}


@dataclass
class Checked:
    """A prompt's final outcome after retries: the accepted value, or why it was dropped."""

    value: Any = None
    generation: Generation | None = None
    attempts: int = 0
    reason: str = ""  # empty when accepted

    @property
    def ok(self) -> bool:
        return not self.reason


def generate_checked(
    backend: LLMBackend,
    prompts: list[Prompt],
    params: SamplingParams,
    parse: Callable[[Generation], Any] | Sequence[Callable[[Generation], Any]],
    attempts: int = 3,
) -> list[Checked]:
    """Generate, parse, and regenerate only the prompts whose output was rejected.

    `parse` turns an acceptable generation into a value and raises ValueError (with the reason) for
    one that must be retried: no stop, malformed structure, failed request. After `attempts` tries a
    prompt is dropped with the last reason. Retries reseed so a sampled generation can change.
    A sequence of parsers gives each prompt its own (checks that depend on the prompt's content).
    """
    parsers = [parse] * len(prompts) if callable(parse) else list(parse)
    results = [Checked() for _ in prompts]
    todo = list(range(len(prompts)))
    for attempt in range(attempts):
        if not todo:
            break
        seed = None if params.seed is None else params.seed + attempt
        gens = backend.generate([prompts[i] for i in todo], replace(params, seed=seed))
        still = []
        for i, gen in zip(todo, gens, strict=True):
            res = results[i]
            res.attempts, res.generation = attempt + 1, gen
            try:
                res.value, res.reason = parsers[i](gen), ""
            except ValueError as e:
                res.value, res.reason = None, str(e)
                still.append(i)
        todo = still
    return results


def require_stop(gen: Generation) -> str:
    """The basic acceptance rule: the request worked and the model stopped on its own."""
    if gen.finish_reason == FINISH_ERROR:
        raise ValueError(f"request failed: {gen.error}")
    if gen.finish_reason != FINISH_STOP:
        raise ValueError(f"generation did not stop (finish_reason={gen.finish_reason})")
    text = gen.text.strip()
    if not text:
        raise ValueError("empty generation")
    return text
