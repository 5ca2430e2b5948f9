import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from groundmill.schema import INDEX_SCHEMA, content_key
from groundmill.shards import (
    INDEX_DIR,
    SCRATCH_MARKER,
    SHARDS_DIR,
    ShardWriter,
    TarAppender,
    clean_uncommitted,
    fresh_scratch_dir,
    iter_shard,
    read_index,
    tar_header,
)


def _record(key):
    return {
        "schema_version": 1,
        "key": key,
        "media": {"type": "image", "ext": "jpg", "width": 2, "height": 2},
    }


def test_shard_round_trips_through_webdataset(tmp_path):
    writer = ShardWriter(tmp_path, name="s0")
    keys = [content_key(bytes([i])) for i in range(3)]
    for i, key in enumerate(keys):
        writer.add_sample(key, b"jpegbytes%d" % i, "jpg", _record(key), {"uri": f"u{i}", "status": "ok"})
    writer.add_row({"uri": "bad", "status": "error", "error": "load: empty file"})
    writer.commit()

    samples = list(wds.WebDataset(str(tmp_path / SHARDS_DIR / "s0.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    assert json.loads(samples[1]["json"])["key"] == keys[1] and samples[1]["jpg"] == b"jpegbytes1"
    index = pq.read_table(tmp_path / INDEX_DIR / "s0.parquet")
    assert index.schema.equals(INDEX_SCHEMA)
    rows = index.to_pylist()
    assert [r["shard"] for r in rows] == ["shards/s0.tar"] * 3 + [None]
    assert rows[-1]["error"] == "load: empty file"


@pytest.mark.parametrize("mtime", [1_700_000_000, 1.7e9])  # whole seconds (what samples get), a float
@pytest.mark.parametrize("sizes", [(0, 2), (511, 512), (513, 10_000), (300_000, 7), (65_536, 70_000)])
def test_tar_appender_writes_the_bytes_of_webdatasets_tar_writer(sizes, mtime):
    """The shard writer appends tar members itself (no stream-mode re-buffering, its own headers):
    byte for byte what webdataset's TarWriter writes, for payloads at and around the 512-byte block
    size and the size from which a payload is written alone."""
    members = [{"jpg": b"j" * sizes[0], "json": b"{}"}, {"mp4": b"m" * sizes[1], "json": b'{"a":1}'}]
    keys = ["ab" * 8, "cd" * 32]
    expected = io.BytesIO()
    writer = wds.TarWriter(expected, encoder=False, mtime=mtime)
    for key, files in zip(keys, members, strict=True):
        writer.write({"__key__": key, **files})
    writer.close()
    ours = io.BytesIO()
    appender = TarAppender(ours, mtime=mtime)
    for key, files in zip(keys, members, strict=True):
        appender.add_sample(key, files)
    appender.close()
    assert ours.getvalue() == expected.getvalue()
    with tarfile.open(fileobj=io.BytesIO(ours.getvalue())) as tar:
        assert [m.name for m in tar] == ["abababababababab.jpg", "abababababababab.json",
                                         f"{'cd' * 32}.json", f"{'cd' * 32}.mp4"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "size", "mtime"),
    [("a.jpg", 0, 0), ("f" * 96 + ".jpg", 1, 1), ("f" * 97 + ".jpg", 2, 3), ("é.json", 5, 7),
     ("k.mp4", 8**11 - 1, 8**11 - 1), ("k.mp4", 8**11, 1), ("k.mp4", 3, 8**11), ("k.mp4", 3, 1.5)],
)  # fmt: skip
def test_tar_header_is_tarfiles_for_every_name_size_and_time(name, size, mtime):
    """The templated ustar header equals TarInfo.tobuf, at the 100-byte name limit, the 11-digit
    octal limits, a non-ASCII name and a float time (the last four go through tarfile: PAX)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, mtime, 0o444, "bigdata", "bigdata"
    assert tar_header(name, size, mtime) == info.tobuf(
        tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"
    )


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="content hash"):
        ShardWriter(tmp_path).add_sample("abc.def", b"x", "jpg", {}, {})


def test_uncommitted_files_are_cleaned_and_committed_ones_kept(tmp_path):
    writer = ShardWriter(tmp_path, name="done")
    key = content_key(b"a")
    writer.add_sample(key, b"x", "jpg", _record(key), {"uri": "a", "status": "ok"})
    writer.commit()
    (tmp_path / SHARDS_DIR / "orphan.tar").write_bytes(b"killed before its index part")
    (tmp_path / SHARDS_DIR / ".x.tar.1234.tmp").write_bytes(b"partial")
    removed = {p.name for p in clean_uncommitted(tmp_path)}
    assert removed == {"orphan.tar", ".x.tar.1234.tmp"}
    assert (tmp_path / SHARDS_DIR / "done.tar").exists()
    assert read_index(tmp_path).num_rows == 1


def test_failed_commit_leaves_nothing_visible(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path, name="s")
    key = content_key(b"a")
    writer.add_sample(key, b"x", "jpg", _record(key), {"uri": "a", "status": "ok"})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space"):
        writer.commit()
    clean_uncommitted(tmp_path)
    assert list((tmp_path / SHARDS_DIR).iterdir()) == [] and list((tmp_path / INDEX_DIR).iterdir()) == []


def test_samples_stream_to_a_hidden_temp_file_until_commit(tmp_path):
    """The tar goes to disk as samples arrive (no shard-sized buffer in the write task) and stays
    hidden until commit; a discarded writer leaves nothing."""
    for finish in ("commit", "discard"):
        out = tmp_path / finish
        writer = ShardWriter(out, name="s")
        key = content_key(finish.encode())
        writer.add_sample(key, b"x" * 100_000, "jpg", _record(key), {"uri": "a", "status": "ok"})
        (temp,) = (out / SHARDS_DIR).iterdir()
        assert temp.name.startswith(".s.tar.") and temp.stat().st_size == writer.nbytes >= 100_000
        getattr(writer, finish)()
        names = sorted(p.name for p in out.rglob("*") if p.is_file())
        assert names == (["s.parquet", "s.tar"] if finish == "commit" else [])


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/passwd.jpg", "a/../../b.json"])
def test_unsafe_tar_members_are_refused(tmp_path, name):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        member = tarfile.TarInfo(name)  # added by hand: tar.add() would strip a leading "/"
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="unsafe member"):
        list(iter_shard(path))


def test_scratch_dir_is_cleared_only_if_groundmill_made_it(tmp_path):
    scratch = fresh_scratch_dir(tmp_path / "bench")
    (scratch / "old.json").write_text("{}")
    assert list(fresh_scratch_dir(scratch).iterdir()) == [scratch / SCRATCH_MARKER]  # its own: rebuilt
    data = tmp_path / "data"
    data.mkdir()
    (data / "photo.jpg").write_bytes(b"someone's file")
    with pytest.raises(SystemExit, match="not a groundmill scratch folder"):
        fresh_scratch_dir(data)
    assert (data / "photo.jpg").read_bytes() == b"someone's file"
    assert (fresh_scratch_dir(tmp_path / "empty") / SCRATCH_MARKER).is_file()
