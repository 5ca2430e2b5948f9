"""Where a model id's files are, and whether they hold random weights (no torch here: the driver
asks this for the run record before any model loads).

A model id is `tiny` (built in code, random), a local path, or a Hugging Face repo id, optionally
`hf-hub:`-prefixed (open_clip's form). Repo ids resolve through the standard Hugging Face cache
(`HF_HUB_CACHE`, or `HF_HOME/hub`), so with `HF_HUB_OFFLINE=1` a pre-filled cache serves them.

`groundmill fixture hub DIR` fills such a cache with tiny random-weight models in the real repos'
layout; every snapshot it writes carries :data:`FIXTURE_MARKER`, and a model whose files hold the
marker is reported as `random_weights: true`, never as the real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from groundmill.stages.base import ModelSpec

FIXTURE_MARKER = "groundmill_fixture.json"
_HUB_PREFIX = "hf-hub:"


def repo_id(model_id: str) -> str | None:
    """The Hugging Face repo id a model id names (`org/name`), or None for `tiny`, local paths and
    other names (open_clip's `ARCH@PRETRAINED`, `smollm2`)."""
    name = model_id.removeprefix(_HUB_PREFIX)
    if Path(name).expanduser().exists() or "@" in name:
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) else None


def cached_file(model_id: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of a repo id's snapshot in the local Hugging Face cache, or of a local directory; None
    when absent (never downloads)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    repo = repo_id(model_id)
    if repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def random_weights(spec: ModelSpec) -> bool:
    """True for `tiny` and for any model whose files carry the fixture marker."""
    if spec.is_random:
        return True
    local = Path(spec.id).expanduser()
    if local.is_file():  # a checkpoint file: the marker lies beside it
        return (local.parent / FIXTURE_MARKER).is_file()
    return cached_file(spec.id, FIXTURE_MARKER, spec.revision) is not None
