"""`groundmill run ... --retry-errors`: error rows whose code says the failure was transient (I/O,
timeout, LLM unavailable, out of memory: `schema.TRANSIENT_ERROR_CODES`) are withdrawn from the index,
so the run annotates their inputs again; permanent failures (corrupt, bomb, ...) stay as they are.

Error rows live in index parts without a tar (the sink writes them apart), so withdrawing one rewrites
only such a part, atomically; a run killed after that finds the input pending, as any resume does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from groundmill.schema import STATUS_ERROR, TRANSIENT_ERROR_CODES
from groundmill.shards import INDEX_DIR, index_table, read_index_part, rewrite_index_part

log = logging.getLogger("groundmill")


def is_transient(row: dict[str, Any]) -> bool:
    return row["status"] == STATUS_ERROR and row["error_code"] in TRANSIENT_ERROR_CODES


def withdraw_transient_errors(out: str | Path) -> int:
    """Remove the transient error rows from OUT's index; returns how many were withdrawn."""
    withdrawn = 0
    for part in sorted((Path(out) / INDEX_DIR).glob("*.parquet")):
        table = read_index_part(part)
        if not pc.any(pc.equal(table["status"], STATUS_ERROR)).as_py():
            continue
        rows = table.to_pylist()
        kept = [r for r in rows if not is_transient(r)]
        if len(kept) == len(rows):
            continue
        if any(r["shard"] for r in rows):  # never the case for the sink's parts; refuse to guess
            raise ValueError(f"index part {part.name} mixes samples and error rows: not withdrawing from it")
        if kept:
            rewrite_index_part(part, index_table(kept))
        else:
            part.unlink()
        withdrawn += len(rows) - len(kept)
    if withdrawn:
        log.info("--retry-errors: %d error row(s) with a transient code will be attempted again", withdrawn)
    return withdrawn
