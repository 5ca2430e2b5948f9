"""Input sources: folders, globs, JSONL / Parquet lists of URIs, and existing WebDataset shards.

The driver only lists URIs (strings); the bytes are read inside Ray tasks by :func:`read_uri`, so
listing a million inputs costs a list of strings, never their content.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from groundmill.shards import safe_members

TAR_SEPARATOR = "#"  # "shard.tar#member" addresses one member of an input shard
MEDIA_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg",
}  # fmt: skip


class SourceError(ValueError):
    """An input spec names nothing readable; raised before any work starts."""


def _walk(folder: Path) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield str(Path(root) / name)


def _list_file(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                uri = item if isinstance(item, str) else item.get("uri") if isinstance(item, dict) else None
                if not isinstance(uri, str):
                    raise SourceError(f"{path}:{n}: expected a string or an object with a 'uri' string")
                yield _resolve(uri, path.parent)
    elif suffix == ".parquet":
        table = pq.read_table(path, columns=["uri"])
        for uri in table.column("uri").to_pylist():
            yield _resolve(uri, path.parent)
    elif suffix == ".tar":
        with tarfile.open(path) as tar:
            for member in safe_members(tar):
                if Path(member.name).suffix.lower() in MEDIA_SUFFIXES:
                    yield f"{path}{TAR_SEPARATOR}{member.name}"
    else:
        yield str(path)


def _resolve(uri: str, base: Path) -> str:
    """Relative paths in a list are relative to the list file; URLs and absolute paths stay."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return str(base / uri)


def list_inputs(specs: list[str]) -> list[str]:
    """Expand input specs into URIs, in a stable order, each URI once."""
    uris: dict[str, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if "://" in spec and not spec.startswith("file://"):
            found = [spec]
        elif path.is_dir():
            found = [u for p in _walk(path) for u in _list_file(Path(p))]
        elif path.is_file():
            found = list(_list_file(path))
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise SourceError(f"input {spec!r} matches no file or folder")
            found = [u for m in matches if Path(m).is_file() for u in _list_file(Path(m))]
        for uri in found:
            uris.setdefault(uri, None)
    return list(uris)


def read_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of one input: a local path, file:// or remote URI (pyarrow.fs), or a tar member."""
    if TAR_SEPARATOR in uri and uri.split(TAR_SEPARATOR, 1)[0].endswith(".tar"):
        shard, member_name = uri.split(TAR_SEPARATOR, 1)
        with tarfile.open(shard) as tar:
            for member in safe_members(tar):
                if member.name == member_name:
                    return _bounded(tar.extractfile(member).read(max_bytes + 1), max_bytes)
        raise FileNotFoundError(f"no member {member_name!r} in {shard}")
    if "://" in uri and not uri.startswith("file://"):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as f:
            return _bounded(f.read(max_bytes + 1), max_bytes)
    path = urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri
    with open(path, "rb") as f:
        return _bounded(f.read(max_bytes + 1), max_bytes)


def _bounded(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise OSError(f"file larger than limits.max_file_mb ({max_bytes // 2**20} MiB)")
    return data
