"""Grouped vocabularies (`group: value, value, ...` lines): the scene categories and attribute lists."""

from __future__ import annotations

from pathlib import Path

VOCAB_DIR = Path(__file__).parent / "vocab"


def load_groups(name: str) -> dict[str, list[str]]:
    """A shipped grouped vocabulary (by stem) or an explicit `.txt` file; `#` starts a comment line."""
    path = Path(name) if name.endswith(".txt") else VOCAB_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"grouped vocabulary {name!r} not found (looked for {path})")
    groups: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        group, sep, values = line.partition(":")
        words = [w.strip().lower() for w in values.split(",") if w.strip()]
        if not sep or not words:
            raise ValueError(f"{path}:{n}: expected 'group: value, value, ...'")
        groups[group.strip().lower()] = words
    return groups
