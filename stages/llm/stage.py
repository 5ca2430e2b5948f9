"""The base of the stages that prompt an LLM: backend set-up once per actor, sampling settings from
the manifest, provenance (backend, model, prompt id and template hash), and how outputs and drops are
written into a frame record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from groundmill.prompts import PromptTemplate, RenderedPrompt, load_prompt
from groundmill.schema import ErrorCode, FrameRecord, error_reason
from groundmill.stages.base import Sample, Stage
from groundmill.stages.llm import (
    Checked,
    Generation,
    LLMBackend,
    LLMConfig,
    SamplingParams,
    generate_checked,
    make_backend,
)
from groundmill.stages.llm.http import GAVE_UP
from groundmill.stages.llm.parsing import parse_prose


def llm_failure_code(reason: str) -> ErrorCode:
    """Why a prompt's last attempt failed, as a code: the server never answered (transient: timeout or
    unavailable), or it answered with text that failed the checks (permanent for these settings)."""
    if GAVE_UP in reason:
        return ErrorCode.TIMEOUT if "timeout" in reason else ErrorCode.LLM_UNAVAILABLE
    if "out of memory" in reason.lower():
        return ErrorCode.OUT_OF_MEMORY
    return ErrorCode.LLM_OUTPUT


# (sample, the frame record to write into, its rendered prompt)
Job = tuple[Sample, FrameRecord, RenderedPrompt]


class LLMStage(Stage):
    """Set `prompt_name`; subclasses extend `Params` (a dataclass subclass of LLMStage.Params)."""

    prompt_name: ClassVar[str]
    uses_pixels = False  # LLMs here read the record's text, never the image

    @dataclass
    class Params:
        llm: LLMConfig = field(default_factory=LLMConfig)
        max_new_tokens: int = 512
        temperature: float = 0.7
        top_p: float = 0.95
        attempts: int = 3  # generations per prompt before the output is given up
        # After the last attempt: "error" makes the sample an error row (the index says why); "drop"
        # keeps the sample without this output (GranD's behaviour), the reason in `llm_drops`.
        on_failure: str = "error"

    def uses_llm(self) -> bool:
        """Whether this configuration calls the LLM at all (optional LLM passes override this)."""
        return True

    @property
    def prompt(self) -> PromptTemplate:
        return load_prompt(self.prompt_name)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.params.on_failure not in ("error", "drop"):
            raise ValueError(f"params.on_failure must be 'error' or 'drop', not {self.params.on_failure!r}")

    def setup(self) -> None:
        self.backend: LLMBackend | None = None
        if self.uses_llm():
            spec = self.model_spec
            self.backend = make_backend(self.params.llm, spec.id, spec.device, spec.dtype, seed=self.seed)
            self.backend.setup()

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def sampling(self) -> SamplingParams:
        p = self.params
        return SamplingParams(p.max_new_tokens, p.temperature, p.top_p, seed=self.seed)

    def provenance(self) -> dict[str, Any]:
        if not self.uses_llm():
            return {}
        return {**super().provenance(), "backend": self.params.llm.backend, **self.prompt.provenance()}

    def record_output(self, frame: FrameRecord, rendered: RenderedPrompt, result: Checked) -> None:
        """Where the text came from, next to it: prompt id and hashes, attempts, finish, tokens."""
        gen = result.generation
        frame.setdefault("generations", {})[self.name] = {
            **rendered.provenance(),
            "backend": self.params.llm.backend,
            "attempts": result.attempts,
            "finish_reason": gen.finish_reason if gen else None,
            "tokens": gen.tokens if gen else 0,
        }

    def record_drop(
        self, sample: Sample, frame: FrameRecord, rendered: RenderedPrompt, result: Checked
    ) -> None:
        """A dropped output stays visible: the reason in the record, a count in the index stats."""
        frame.setdefault("llm_drops", []).append(
            {
                "stage": self.name,
                "reason": result.reason,
                "attempts": result.attempts,
                **rendered.provenance(),
            }
        )
        key = f"{self.name}.dropped"
        sample.stats[key] = sample.stats.get(key, 0.0) + 1.0
        if self.params.on_failure == "error":
            reason = f"LLM output failed after {result.attempts} attempts: {result.reason}"
            sample.fail(self.name, error_reason(llm_failure_code(result.reason), reason))

    def run_jobs(
        self,
        jobs: list[Job],
        parse: Callable[[Generation], Any] | Sequence[Callable[[Generation], Any]],
        write: Callable[[FrameRecord, Any], None],
    ) -> None:
        """Generate for every job at once (with retries), then write each value or record its drop."""
        results = generate_checked(
            self.backend, [r.messages for _, _, r in jobs], self.sampling(), parse, self.params.attempts
        )
        for (sample, frame, rendered), result in zip(jobs, results, strict=True):
            if result.ok:
                write(frame, result.value)
                self.record_output(frame, rendered, result)
            else:
                self.record_drop(sample, frame, rendered, result)


class ProseStage(LLMStage):
    """An LLM stage whose output is sentences (a caption, a paragraph)."""

    @dataclass
    class Params(LLMStage.Params):
        max_sentences: int = 4
        # GranD drops generations cut at the token limit; True keeps their complete sentences instead
        # (useful with a small max_new_tokens on CPU).
        accept_truncated: bool = False

    def parse(self, gen: Generation) -> str:
        return parse_prose(gen, 1, self.params.max_sentences, self.params.accept_truncated)
