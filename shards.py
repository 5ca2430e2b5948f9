"""The on-disk format (foundation): WebDataset tar shards plus a Parquet index, committed atomically,
and the readers of both for the sink, the trainer, inspect, report and the synthetic data.

Layout of an output directory::

    shards/<name>.tar        samples: {key}.{ext} and {key}.json, adjacent; one media ext per shard
    index/<name>.parquet     one row per input handled by that shard's writer (errors included)
    run.json                 the run record

A shard is committed in two atomic steps: the tar is written to a temp file and renamed, then the
index part is written to a temp file and renamed. The index part is the commit marker: a tar
without its index part is an orphan from a killed run, removed on the next start (its inputs are
not in the index, so they are redone). Rerunning therefore never loses or duplicates a sample.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from groundmill.schema import INDEX_SCHEMA, ErrorCode, Record, is_valid_key

SHARDS_DIR = "shards"
INDEX_DIR = "index"
TMP_SUFFIX = ".tmp"
SHARD_BYTES = b"groundmill.shard_bytes"  # index part metadata: the size of its committed tar


def _temp_path(path: Path) -> Path:
    """A hidden, unique temp name beside `path` (what `clean_uncommitted` removes)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _publish(f: Any, path: Path) -> None:
    """Make a written temp file durable (flush, fsync, close), then rename it over `path`."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(f.name, path)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            _publish(f, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _as_entries(value: Any, struct: pa.StructType) -> list[dict[str, Any]] | None:
    """{name: number} (what stages keep) or v1's MAP rows [(name, number)] -> [{name_field, value_field}]."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else value
    name, number = (f.name for f in struct)
    return [e if isinstance(e, dict) else {name: e[0], number: e[1]} for e in items]


def index_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of INDEX_SCHEMA's fields) -> a table of exactly that schema."""
    columns = {}
    for field in INDEX_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if pa.types.is_list(field.type):
            values = [_as_entries(v, field.type.value_type) for v in values]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=INDEX_SCHEMA)


def _tar_header_slow(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, mtime, 0o444, "bigdata", "bigdata"
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


# tarfile's header of a member with an empty name, zero size and time, and the checksum field blank:
# every other field is as tarfile (this Python's version of it) writes them.
_HEADER = bytearray(_tar_header_slow("", 0, 0))
_HEADER[148:156] = b" " * 8
_OCTAL_11 = 8**11  # an 11-digit octal field holds less than this


def tar_header(name: str, size: int, mtime: float) -> bytes:
    """tarfile's header block(s) for a member (`TarInfo.tobuf`, PAX format, as TarAppender sets them).

    A short ASCII name with an integer size and time (every sample member) needs one plain ustar
    block: the template above with name, size, mtime and checksum filled in, in 3.5 us instead of
    tarfile's 19 (a 256 KB payload takes 50 us to write). Anything else asks tarfile."""
    raw = name.encode("ascii", "ignore")
    plain = len(raw) == len(name) <= 100 and isinstance(mtime, int) and 0 <= mtime < _OCTAL_11
    if not (plain and 0 <= size < _OCTAL_11):
        return _tar_header_slow(name, size, mtime)
    header = _HEADER.copy()
    header[: len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class TarAppender:
    """Tar members appended straight to a file: the bytes webdataset's TarWriter writes (tarfile's
    stream mode `w|`: PAX format, mode 0o444, owner `bigdata`, members of a sample in sorted
    extension order, two zero blocks and padding to a 10 KiB record at the end), without the stream
    mode's 10 KiB re-buffering, which copies every payload many times (a third of raw disk speed).

    Each sample's time is whole seconds, as tar keeps it: the float TarWriter stamps costs every
    member an extended PAX header (1 KiB, and twice the header work). A sample's small parts
    (headers, padding, small payloads) go out in one write, a large payload in a write of its own."""

    BIG = 64 * 1024  # payloads from this size are written alone rather than copied into the batch

    def __init__(self, f: Any, mtime: float | None = None):
        self.f, self.mtime = f, mtime  # mtime: fixed for reproducible tars, else each sample's time

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        mtime = int(time.time()) if self.mtime is None else self.mtime
        small = bytearray()
        for ext in sorted(members):
            data = members[ext]
            small += tar_header(f"{key}.{ext}", len(data), mtime)
            if len(data) >= self.BIG:
                self.f.write(small)
                self.f.write(data)
                small.clear()
            else:
                small += data
            small += tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)
        self.f.write(small)

    def close(self) -> None:
        self.f.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self.f.write(tarfile.NUL * (-self.f.tell() % tarfile.RECORDSIZE))


class ShardWriter:
    """Streams one shard's samples into a hidden temp file and keeps its index rows; `commit` makes
    both visible atomically.

    The tar goes straight to disk (no in-memory copy of the shard), so a write task holds only the
    index rows, and a temp file left by a killed task is removed by `clean_uncommitted`.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str | None = None):
        self.out_dir = Path(out_dir)
        self.name = name or uuid.uuid4().hex
        self._file: Any = None  # opened at the first sample: a shard of error rows only has no tar
        self._writer: TarAppender | None = None
        self._rows: list[dict[str, Any]] = []
        self.num_samples = 0
        self.media_ext: str | None = None  # a shard holds one media extension (uniform for its readers)

    @property
    def shard_file(self) -> str:
        return f"{SHARDS_DIR}/{self.name}.tar"

    @property
    def _tar_path(self) -> Path:
        return self.out_dir / self.shard_file

    @property
    def nbytes(self) -> int:
        return self._file.tell() if self._file else 0

    def add_sample(self, key: str, media: bytes, media_ext: str, record: Record, row: dict[str, Any]) -> None:
        if not is_valid_key(key):
            raise ValueError(f"sample key {key!r} is not a lowercase hex content hash")
        if self.media_ext not in (None, media_ext):
            raise ValueError(f"shard {self.name} holds .{self.media_ext} media, not .{media_ext} ({key})")
        self.media_ext = media_ext
        if self._writer is None:
            self._tar_path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: each sample is on disk once added (no shard-sized buffer in the write task).
            self._file = open(_temp_path(self._tar_path), "wb", buffering=0)  # noqa: SIM115 (closed by commit/discard)
            self._writer = TarAppender(self._file)
        body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        self._writer.add_sample(key, {media_ext: media, "json": body})
        self._rows.append({**row, "key": key, "shard": self.shard_file})
        self.num_samples += 1

    def add_row(self, row: dict[str, Any]) -> None:
        """An index row with no sample in this shard: an error, or a duplicate of another input."""
        self._rows.append({**row, "shard": None})

    def __len__(self) -> int:
        return len(self._rows)

    def commit(self) -> None:
        if not self._rows:
            return
        try:
            if self._writer is not None:
                self._writer.close()
                _publish(self._file, self._tar_path)
        except BaseException:
            self.discard()
            raise
        (self.out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
        table = index_table(self._rows)
        if self._writer is not None:  # lets a resume see a tar truncated or replaced since
            table = table.replace_schema_metadata({SHARD_BYTES: str(self._tar_path.stat().st_size)})
        try:
            _atomic_write(
                self.out_dir / INDEX_DIR / f"{self.name}.parquet", lambda f: pq.write_table(table, f)
            )
        except BaseException:
            # Not committed: leave no tar that readers could mistake for one.
            self._tar_path.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        """Drop what was written so far (a failed write task); nothing of it becomes visible."""
        if self._file is None:
            return
        with contextlib.suppress(OSError, ValueError):  # the disk may be what failed
            self._file.close()
        Path(self._file.name).unlink(missing_ok=True)


def read_index_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One index part as INDEX_SCHEMA: a v1 part (MAP timings and stats, no error_stage/error_code)
    is converted on reading."""
    if pq.read_schema(path).remove_metadata().equals(INDEX_SCHEMA):
        return pq.read_table(path, columns=columns, schema=INDEX_SCHEMA)
    return index_table(pq.read_table(path).to_pylist()).select(columns or INDEX_SCHEMA.names)


def read_index(out_dir: str | os.PathLike, columns: list[str] | None = None, parts: str = "*") -> pa.Table:
    """The committed index parts of an output directory (all, or those whose name matches the glob
    `parts`) as one table (empty if none); v1 parts are read as v2."""
    found = sorted((Path(out_dir) / INDEX_DIR).glob(f"{parts}.parquet"))
    if not found:
        return INDEX_SCHEMA.empty_table().select(columns or INDEX_SCHEMA.names)
    return pa.concat_tables(read_index_part(p, columns) for p in found)


def rewrite_index_part(path: Path, table: pa.Table) -> None:
    """Replace a committed index part atomically (temp file, fsync, rename)."""
    _atomic_write(path, lambda f: pq.write_table(table, f))


def clean_uncommitted(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temp files and orphan tars (no index part) left by a killed run; return what was removed."""
    out = Path(out_dir)
    committed = {p.stem for p in (out / INDEX_DIR).glob("*.parquet")}
    removed = []
    for folder in (out / SHARDS_DIR, out / INDEX_DIR):
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            p.unlink(missing_ok=True)
            removed.append(p)
    for tar in (out / SHARDS_DIR).glob("*.tar"):
        if tar.stem not in committed:
            tar.unlink(missing_ok=True)
            removed.append(tar)
    return removed


SCRATCH_MARKER = ".groundmill-scratch"  # written into every folder a bench or the loop owns


def fresh_scratch_dir(path: str | os.PathLike) -> Path:
    """An empty folder for a bench or `make loop` to rebuild from scratch. A folder is cleared only if it
    is empty or holds the marker a previous call wrote: a mistyped `--out` naming someone's data fails
    instead of being deleted."""
    folder = Path(path)
    if folder.exists() and not (folder / SCRATCH_MARKER).is_file() and any(folder.iterdir()):
        raise SystemExit(f"{folder}: not empty and not a groundmill scratch folder; name an empty or new one")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / SCRATCH_MARKER).write_text("made by groundmill; cleared and rebuilt by the next run here\n")
    return folder


def _tar_holds(tar: Path, members: int) -> bool:
    """Whether a tar (written before SHARD_BYTES existed) reads whole with at least `members` members."""
    size = tar.stat().st_size
    try:
        with tarfile.open(tar, "r:") as t:
            found = [m for m in t if m.offset_data + m.size <= size]
    except (tarfile.TarError, OSError):
        return False
    return len(found) >= members


def _tar_is_whole(tar: Path, part: Path, samples: int) -> bool:
    if not tar.is_file():
        return False
    recorded = (pq.read_schema(part).metadata or {}).get(SHARD_BYTES)
    if recorded is not None:
        return tar.stat().st_size == int(recorded)
    return _tar_holds(tar, 2 * samples)  # media + json per sample


def lost_shards(out_dir: str | os.PathLike) -> list[str]:
    """Names of committed shards whose tar is missing, truncated or replaced since its commit."""
    out = Path(out_dir)
    lost = []
    for part in sorted((out / INDEX_DIR).glob("*.parquet")):
        shard = pq.read_table(part, columns=["shard"]).column("shard")
        samples = len(shard) - shard.null_count
        if not samples:
            continue  # a part of error / duplicate rows only has no tar
        if not _tar_is_whole(out / SHARDS_DIR / f"{part.stem}.tar", part, samples):
            lost.append(part.stem)
    return lost


def forget_shard(out_dir: str | os.PathLike, name: str) -> None:
    """Withdraw a commit: the index part first (its inputs become pending again), then the tar."""
    out = Path(out_dir)
    (out / INDEX_DIR / f"{name}.parquet").unlink(missing_ok=True)
    (out / SHARDS_DIR / f"{name}.tar").unlink(missing_ok=True)


def member_problem(member: tarfile.TarInfo) -> tuple[ErrorCode, str] | None:
    """Why a tar member must not be read as a file (an absolute path, `..`, a link, a device), or None."""
    name = member.name
    if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
        return ErrorCode.UNSAFE_PATH, f"unsafe member path {name!r}"
    if not member.isfile():
        return ErrorCode.NOT_REGULAR_FILE, f"member {name!r} is not a regular file"
    return None


def safe_members(tar: tarfile.TarFile) -> Iterable[tarfile.TarInfo]:
    """Members of a tar, refusing absolute paths, `..`, links and anything that is not a plain file."""
    for member in tar:
        problem = member_problem(member)
        if problem:
            raise ValueError(f"{problem[1]} in {tar.name}")
        yield member


def iter_shard(path: str | os.PathLike) -> Iterable[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one tar, members checked; a sample's files must be adjacent."""
    with tarfile.open(path, "r") as tar:
        key, files = None, {}
        for member in safe_members(tar):
            base = Path(member.name).name
            k, _, ext = base.partition(".")
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            if ext in files:
                raise ValueError(f"{path}: member {member.name!r} repeats sample {k!r}")
            files[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, files
