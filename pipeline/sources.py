"""Input sources: folders, globs, JSONL / Parquet lists of URIs, and existing WebDataset shards.

The driver only lists URIs (strings); the bytes are read inside Ray tasks by :func:`read_uri`, so
listing a million inputs costs a list of strings, never their content.

Inputs stay confined. A folder walk keeps regular files only (checked without following links),
follows a symlink only when it stays inside the folder (or `follow_links` asks), never enters a
folder twice (no loops) and never lists the excluded output directory. A `.jsonl` / `.parquet` file
is a list of URIs only when given as an input itself; found in a folder it is just a file. Remote
URIs must use an allowlisted scheme and carry neither credentials nor query options (pyarrow turns
those into filesystem settings such as `endpoint_override`). Reading opens files non-blocking and
checks their type and size before reading a byte. Each input shard is indexed once (member
offsets), so reading its members costs one seek each.

A failure tied to one input (a corrupt tar, a hostile member, a refused URI) does not stop the
listing: :func:`list_sources` returns it as a failure, which the run writes as that input's error row.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import pyarrow.parquet as pq

from groundmill.schema import ErrorCode, error_reason
from groundmill.shards import member_problem

TAR_SEPARATOR = "#"  # "shard.tar#member" addresses one member of an input shard
MEDIA_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg",
}  # fmt: skip
LIST_SUFFIXES = {".jsonl", ".parquet"}
REMOTE_SCHEMES = {"s3", "gs", "gcs", "hdfs"}  # read through pyarrow.fs
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@/?#]*(?::[^@?#]*)?)@")
SECRET_NAME = re.compile(r"sig|secret|token|passw|credential|auth|session|key", re.IGNORECASE)


class SourceError(ValueError):
    """An input spec names nothing readable, or a list is malformed; raised before any work starts."""


class InputError(OSError, ValueError):
    """One input cannot be read; `code` (an ErrorCode) says why, for its error row."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code


@dataclass
class Listing:
    """What the inputs expand to: URIs to read, and inputs already refused while listing."""

    uris: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # redacted uri -> "[code] reason"
    skipped: int = 0  # files inside an excluded (output) directory


# ---------------------------------------------------------------------------------------------------------
# URIs: allowlisted, credential-free, redacted before they reach any output.


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def redact_uri(uri: str) -> str:
    """The URI with userinfo and secret-looking query values replaced by `***` (index, records, logs)."""
    if "://" not in uri:
        return uri
    uri = _USERINFO.sub(r"\1***@", uri)
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return base + "?" + "&".join(f"{k}={'***' if SECRET_NAME.search(k) else v}" for k, v in pairs)


def check_uri(uri: str) -> None:
    """Refuse a remote URI that could send a worker elsewhere than the named object store."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in REMOTE_SCHEMES:
        allowed = ", ".join(sorted(REMOTE_SCHEMES | {"file"}))
        raise InputError(ErrorCode.UNSAFE_URI, f"URI scheme {scheme!r} is not allowed (allowed: {allowed})")
    if _USERINFO.match(uri):
        raise InputError(
            ErrorCode.UNSAFE_URI, "credentials in a URI are refused: give them through the environment"
        )
    if "?" in uri:
        raise InputError(
            ErrorCode.UNSAFE_URI,
            "query options in a URI are refused (pyarrow reads them as filesystem settings such as "
            "endpoint_override or scheme)",
        )


def _local_path(uri: str) -> str:
    return urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri


# ---------------------------------------------------------------------------------------------------------
# Listing.


def _file_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Walker:
    """Regular files under `root` in name order, confined to it (see the module docstring)."""

    def __init__(self, root: Path, excluded: set[tuple[int, int]], follow_links: bool):
        self.root = root.resolve()
        self.excluded = excluded
        self.follow_links = follow_links
        self.seen: set[tuple[int, int]] = set()
        self.skipped = 0
        self.unreadable: dict[str, str] = {}  # folder -> why it could not be listed

    def walk(self, folder: Path, depth: int | None = None) -> Iterator[Path]:
        """`depth`: how many folder levels below `folder` to enter (None: all)."""
        folder_id = _file_id(folder)
        if folder_id is None or folder_id in self.seen:
            return
        self.seen.add(folder_id)
        if folder_id in self.excluded:
            self.skipped += 1
            return
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:  # one unreadable folder is its own error row, not the run's end
            self.unreadable[str(folder)] = e.strerror or str(e)
            return
        for entry in entries:
            mode = self._mode(entry)
            if mode is None:
                continue
            if stat.S_ISDIR(mode) and (depth is None or depth > 0):
                yield from self.walk(Path(entry.path), None if depth is None else depth - 1)
            elif stat.S_ISREG(mode):
                yield Path(entry.path)
            # FIFOs, sockets and devices are never inputs: reading them could block or never end.

    def _mode(self, entry: os.DirEntry) -> int | None:
        """The entry's file type, following a symlink only where allowed; None to skip it."""
        try:
            if not entry.is_symlink():
                return entry.stat(follow_symlinks=False).st_mode
            if not self.follow_links and not Path(entry.path).resolve().is_relative_to(self.root):
                return None
            return os.stat(entry.path).st_mode
        except OSError:  # dangling link, vanished file, no permission
            return None


def _glob_parts_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """glob semantics over path components: `*` stays within one, `**` spans any number."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_parts_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _glob_parts_match(parts[1:], pattern[1:])


def _glob(spec: str, walker_for: Callable[[Path], _Walker]) -> Iterator[Path]:
    """Files matching a glob, found by a confined walk from its literal prefix (no symlink loops)."""
    parts = Path(spec).expanduser().parts
    literal = next((i for i, p in enumerate(parts) if re.search(r"[*?\[]", p)), len(parts))
    base, pattern = Path(*parts[:literal]) if literal else Path("."), parts[literal:]
    if not base.is_dir():
        return
    depth = None if "**" in pattern else len(pattern) - 1
    for path in walker_for(base).walk(base, depth):
        if _glob_parts_match(path.relative_to(base).parts, pattern):
            yield path


class _Lister:
    def __init__(self, excluded: list[str | Path], follow_links: bool):
        self.listing = Listing()
        self.excluded = {i for i in map(_file_id, excluded) if i is not None}
        self.excluded_paths = [Path(p).resolve() for p in excluded]
        self.follow_links = follow_links
        self._uris: dict[str, None] = {}
        self._walkers: list[_Walker] = []

    def add(self, uri: str) -> None:
        self._uris.setdefault(uri, None)

    def fail(self, uri: str, code: ErrorCode, reason: str) -> None:
        self.listing.failures.setdefault(redact_uri(uri), error_reason(code, reason))

    def walker(self, root: Path) -> _Walker:
        walker = _Walker(root, self.excluded, self.follow_links)
        self._walkers.append(walker)
        return walker

    def is_excluded(self, path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(p) for p in self.excluded_paths)

    def spec(self, spec: str) -> None:
        if is_remote(spec):
            self.entry(spec, Path("."))
            return
        path = Path(_local_path(spec)).expanduser()
        if path.is_dir():
            self.folder(path)
        elif os.path.lexists(path):
            self.given_file(path)
        else:
            skipped = self.skipped()
            matches = list(_glob(spec, self.walker))
            if not matches and self.skipped() == skipped:
                raise SourceError(f"input {spec!r} matches no file or folder")
            for match in matches:
                self.found_file(match)

    def folder(self, path: Path) -> None:
        if self.is_excluded(path):
            raise SourceError(f"input {str(path)!r} is inside the output directory")
        for found in self.walker(path).walk(path):
            self.found_file(found)

    def skipped(self) -> int:
        return self.listing.skipped + sum(w.skipped for w in self._walkers)

    def given_file(self, path: Path) -> None:
        """A file named as an input: a list of URIs, a tar of inputs, or one input."""
        if self.is_excluded(path):
            self.listing.skipped += 1
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            for uri in _list_file(path):
                self.entry(uri, path.parent)
        else:
            self.found_file(path)

    def found_file(self, path: Path) -> None:
        """A file found in a folder or by a glob: a tar of inputs, or one input (lists are files here)."""
        if path.suffix.lower() == ".tar":
            self.tar(path)
        else:
            self.add(str(path))

    def entry(self, uri: str, base: Path) -> None:
        """One URI of a list (relative paths are relative to the list) or a remote spec."""
        if is_remote(uri):
            try:
                check_uri(uri)
            except InputError as e:
                self.fail(uri, e.code, str(e))
                return
            self.add(uri)
            return
        path = Path(_local_path(uri))
        path = path if path.is_absolute() else base / path
        if self.is_excluded(path):
            self.listing.skipped += 1
        else:
            self.add(str(path))

    def tar(self, path: Path) -> None:
        try:
            index = tar_index(str(path))
        except InputError as e:
            self.fail(str(path), e.code, str(e))
            return
        for name, (code, reason) in index.failures.items():
            self.fail(f"{path}{TAR_SEPARATOR}{name}", code, reason)
        for name in index.members:
            if Path(name).suffix.lower() in MEDIA_SUFFIXES:
                self.add(f"{path}{TAR_SEPARATOR}{name}")

    def result(self) -> Listing:
        for walker in self._walkers:
            for folder, reason in walker.unreadable.items():
                self.fail(folder, ErrorCode.UNREADABLE, f"cannot list folder: {reason}")
        self.listing.uris = list(self._uris)
        self.listing.skipped = self.skipped()
        return self.listing


def _list_file(path: Path) -> Iterator[str]:
    """The URIs of a `.jsonl` (strings or {"uri": ...} objects) or `.parquet` (a `uri` column) list."""
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path, columns=["uri"])
        except (KeyError, ValueError, OSError) as e:
            raise SourceError(f"{path}: not a Parquet list with a 'uri' column ({e})") from None
        yield from (u for u in table.column("uri").to_pylist() if isinstance(u, str))
        return
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise SourceError(f"{path}:{n}: not JSON") from None
            uri = item if isinstance(item, str) else item.get("uri") if isinstance(item, dict) else None
            if not isinstance(uri, str):
                raise SourceError(f"{path}:{n}: expected a string or an object with a 'uri' string")
            yield uri


def list_sources(specs: list[str], exclude: list[str | Path] = (), follow_links: bool = False) -> Listing:
    """Expand input specs into URIs (stable order, each once) and the inputs refused while listing.

    `exclude`: folders never listed (the run's output). `follow_links`: follow symlinks that leave
    a folder (loops are never followed). Raises SourceError only for a spec that names nothing or a
    malformed list: problems of the manifest, not of one input.
    """
    lister = _Lister(list(exclude), follow_links)
    for spec in specs:
        lister.spec(spec)
    return lister.result()


def list_inputs(specs: list[str], exclude: list[str | Path] = ()) -> list[str]:
    """Like :func:`list_sources`, strict: the first input refused while listing raises SourceError."""
    listing = list_sources(specs, exclude)
    if listing.failures:
        uri, reason = next(iter(listing.failures.items()))
        raise SourceError(f"{uri}: {reason}")
    return listing.uris


# ---------------------------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True)
class TarIndex:
    members: dict[str, tuple[int, int]]  # regular, safe member name -> (data offset, size)
    failures: dict[str, tuple[ErrorCode, str]]  # hostile or unreadable member name -> (code, reason)


def tar_index(path: str) -> TarIndex:
    """One pass over an input tar's headers (cached per process while the file is unchanged)."""
    st = _regular_stat(path)
    return _tar_index(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _tar_index(path: str, mtime_ns: int, size: int) -> TarIndex:
    members: dict[str, tuple[int, int]] = {}
    failures: dict[str, tuple[ErrorCode, str]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed only: offsets must be seekable
            for member in tar:
                problem = member_problem(member)
                if member.isdir():
                    continue
                if problem:
                    failures[member.name] = (problem[0], f"{problem[1]} in {path}")
                elif member.offset_data + member.size > size:
                    failures[member.name] = (ErrorCode.CORRUPT, f"member {member.name!r} is truncated")
                else:
                    members[member.name] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as e:
        raise InputError(ErrorCode.CORRUPT, f"corrupt or truncated tar: {e}") from None
    return TarIndex(members, failures)


def _regular_stat(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(ErrorCode.NOT_FOUND, "no such file") from None
    except OSError as e:
        raise InputError(ErrorCode.UNREADABLE, e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(ErrorCode.NOT_REGULAR_FILE, "not a regular file (a FIFO, device or folder)")
    return st


def _too_large(size: int, max_bytes: int) -> InputError:
    return InputError(
        ErrorCode.TOO_LARGE, f"file larger than limits.max_file_mb ({max_bytes // 2**20} MiB): {size} bytes"
    )


def _read_local(path: str, max_bytes: int, offset: int = 0, size: int | None = None) -> bytes:
    """Open without blocking (a FIFO never hangs), check type and size, then read at most max_bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(ErrorCode.NOT_FOUND, "no such file") from None
    except OSError as e:
        raise InputError(ErrorCode.UNREADABLE, e.strerror or str(e)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(ErrorCode.NOT_REGULAR_FILE, "not a regular file (a FIFO, device or folder)")
    with os.fdopen(fd, "rb") as f:
        want = st.st_size - offset if size is None else size
        if want > max_bytes:
            raise _too_large(want, max_bytes)
        f.seek(offset)
        data = f.read(want + 1)  # one byte more: a file that grew is caught below
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    if size is not None and len(data) < size:
        raise InputError(ErrorCode.CORRUPT, f"truncated: {len(data)} of {size} bytes")
    return data[:size] if size is not None else data


def _read_remote(uri: str, max_bytes: int) -> bytes:
    from pyarrow import fs

    check_uri(uri)
    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise InputError(ErrorCode.NOT_FOUND, "no such object")
    if info.type != fs.FileType.File:
        raise InputError(ErrorCode.NOT_REGULAR_FILE, "not a file")
    if info.size is not None and info.size > max_bytes:
        raise _too_large(info.size, max_bytes)
    with filesystem.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def is_tar_member(uri: str) -> bool:
    return TAR_SEPARATOR in uri and uri.split(TAR_SEPARATOR, 1)[0].endswith(".tar")


def read_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of one input: a local path, file:// or remote URI (pyarrow.fs), or a tar member.

    Raises InputError (an OSError) with an ErrorCode for anything unreadable."""
    if is_tar_member(uri):
        shard, name = uri.split(TAR_SEPARATOR, 1)
        index = tar_index(shard)
        if name in index.failures:
            raise InputError(*index.failures[name])
        if name not in index.members:
            raise InputError(ErrorCode.NOT_FOUND, f"no member {name!r} in {shard}")
        offset, size = index.members[name]
        return _read_local(shard, max_bytes, offset, size)
    if is_remote(uri):
        return _read_remote(uri, max_bytes)
    return _read_local(_local_path(uri), max_bytes)
