"""Versioned prompt templates, one YAML file per task, loaded safely and hashed.

A file holds ``id``, ``version``, ``system``, in-context ``examples`` ([{user, assistant}]) and the
user ``template`` with ``${field}`` placeholders. Rendering yields chat messages plus the two hashes
every LLM output records: the template's (which prompt, which version, exactly) and the rendered
prompt's (exactly what the model saw). Changing a file's text without bumping ``version`` still
changes its hash, so runs stay comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

import yaml

PROMPT_DIR = Path(__file__).parent
_KEYS = {"id", "version", "system", "examples", "template", "description"}


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[dict[str, str]]
    prompt_id: str  # "<id>@v<version>"
    template_hash: str
    rendered_hash: str

    def provenance(self) -> dict[str, str]:
        return {
            "prompt_id": self.prompt_id,
            "template_hash": self.template_hash,
            "prompt_hash": self.rendered_hash,
        }


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: int
    system: str
    examples: tuple[tuple[str, str], ...]
    template: str

    @property
    def prompt_id(self) -> str:
        return f"{self.id}@v{self.version}"

    @property
    def template_hash(self) -> str:
        return _hash([self.id, self.version, self.system, self.examples, self.template])

    def provenance(self) -> dict[str, str]:
        return {"prompt_id": self.prompt_id, "template_hash": self.template_hash}

    def render(self, **fields: Any) -> RenderedPrompt:
        """Chat messages: system, the in-context examples as past turns, then the filled template."""
        try:
            user = Template(self.template).substitute({k: str(v) for k, v in fields.items()})
        except KeyError as e:
            raise KeyError(f"prompt {self.prompt_id} needs field {e.args[0]!r}") from None
        messages = [{"role": "system", "content": self.system.strip()}]
        for example_user, example_answer in self.examples:
            messages.append({"role": "user", "content": example_user.strip()})
            messages.append({"role": "assistant", "content": example_answer.strip()})
        messages.append({"role": "user", "content": user.strip()})
        return RenderedPrompt(messages, self.prompt_id, self.template_hash, _hash(messages))


@cache
def load_prompt(name: str) -> PromptTemplate:
    """A shipped prompt by name (``dense_caption``) or a YAML file path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROMPT_DIR / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"prompt {name!r} not found (shipped prompts: {', '.join(shipped)})")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a prompt file must be a mapping")
    unknown = set(data) - _KEYS
    missing = {"id", "version", "system", "template"} - set(data)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    examples = tuple((ex["user"], ex["assistant"]) for ex in data.get("examples") or [])
    return PromptTemplate(data["id"], int(data["version"]), data["system"], examples, data["template"])
