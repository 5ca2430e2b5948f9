"""`groundmill export OUT_DIR --format F --output DEST`: an engine output in the layout a field tool
reads unchanged, in one streaming pass over the committed shards (bounded memory: one sample at a
time, JSON lists streamed to disk).

Formats (one module each; file names are part of the interface, docs and tests rely on them):

- ``coco``: ``DEST/annotations.json`` (COCO instances, RLE masks), ``DEST/refs.json`` (RefCOCO-style
  refs, JSON not pickle), pictures in ``DEST/images/``;
- ``grandf``: ``DEST/annotations.json``, the GranD-f GCG list GLaMM and X2SAM load;
- ``grand``: ``DEST/annotations/<image stem>.json``, GranD's per-image layout;
- ``refsav``: ``DEST/meta.json`` + ``DEST/videos/`` + ``DEST/masklets/``, Ref-SAV as Sa2VA loads it;
- ``hf``: a Hugging Face dataset saved at DEST (``datasets.load_from_disk``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

FORMATS = {
    "coco": "groundmill.pipeline.export.coco",
    "grandf": "groundmill.pipeline.export.grandf",
    "grand": "groundmill.pipeline.export.grand",
    "refsav": "groundmill.pipeline.export.refsav",
    "hf": "groundmill.pipeline.export.hf",
}


def export(
    out_dir: str | Path, fmt: str, dest: str | Path, progress: bool = True, **options: Any
) -> dict[str, int]:
    """Write engine output `out_dir` as format `fmt` under `dest`; returns what was written (counts)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(FORMATS[fmt])
    return module.write(Path(out_dir), dest, progress=progress, **options)
