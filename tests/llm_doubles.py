"""Test doubles for LLM logic tests: a backend answering from scripts."""

from __future__ import annotations

from groundmill.stages.llm import Generation, LLMBackend, LLMConfig


class ScriptedBackend(LLMBackend):
    """Test double: answers each prompt from a per-prompt script of Generations, logging calls."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[Generation]]):
        super().__init__(LLMConfig(), "scripted")
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls: list[str] = []

    def generate(self, prompts, params):
        self.calls += prompts
        return [self.scripts[p].pop(0) for p in prompts]
