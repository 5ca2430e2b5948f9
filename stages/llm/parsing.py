"""Output parsing shared by the LLM stages: each parser returns the value or raises ValueError with the
reason, which `generate_checked` turns into a retry and, finally, a recorded drop."""

from __future__ import annotations

import json
import re

from groundmill.stages.llm.base import FINISH_LENGTH, Generation, require_stop

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_PREFIX = re.compile(r"^\s*(?:caption|answer|description|phrase|paragraph)\s*:\s*", re.IGNORECASE)
# Words that show the model described the prompt's machinery instead of the image.
LEAKS = ("scene graph", "depth layer", "bounding box", "coordinates", "object id")


def sentences(text: str) -> list[str]:
    """Split after '.', '!' or '?' followed by whitespace or the end."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    return [s for s in out if s] + ([tail] if tail else [])


def complete_sentences(text: str) -> str:
    """The text up to its last sentence end ('' if no sentence ended)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else ""


def clean_text(text: str) -> str:
    """One line of prose: no 'Caption:' prefix, no surrounding quotes, single spaces."""
    text = _PREFIX.sub("", text.strip())
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_prose(
    gen: Generation, min_sentences: int = 1, max_sentences: int = 4, accept_truncated: bool = False
) -> str:
    """Caption or paragraph text. A generation cut at the token limit is rejected (GranD drops it)
    unless `accept_truncated`, which keeps its complete sentences only."""
    if accept_truncated and gen.finish_reason == FINISH_LENGTH:
        text = complete_sentences(clean_text(gen.text))
        if not text:
            raise ValueError("generation did not stop and has no complete sentence")
    else:
        text = clean_text(require_stop(gen))
    lowered = text.lower()
    leak = next((w for w in LEAKS if w in lowered), None)
    if leak:
        raise ValueError(f"output mentions the prompt's machinery ({leak!r})")
    parts = sentences(text)
    if len(parts) < min_sentences:
        raise ValueError(f"{len(parts)} sentence(s), need at least {min_sentences}")
    return " ".join(parts[:max_sentences])


def parse_json_list(gen: Generation) -> list[str]:
    """A JSON list of strings, possibly wrapped in prose or a code fence."""
    text = require_stop(gen)
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ValueError(f"no JSON list in output: {text[:80]!r}")
    try:
        items = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON list: {e.msg}") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("the JSON value is not a list of strings")
    return [i.strip() for i in items if i.strip()]


def parse_phrase(gen: Generation, max_words: int = 16) -> str:
    """A single short phrase: the first line, without a trailing full stop."""
    line = clean_text(require_stop(gen).splitlines()[0]).rstrip(".")
    if not line:
        raise ValueError("empty phrase")
    if len(line.split()) > max_words:
        raise ValueError(f"phrase has {len(line.split())} words, at most {max_words} allowed")
    return line
