import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groundmill.pipeline.sources import SourceError, list_inputs, read_uri


def test_folder_glob_and_lists(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "sub/c.jpg", ".hidden.jpg"):
        (tmp_path / "imgs" / name).write_bytes(name.encode())
    folder = list_inputs([str(tmp_path / "imgs")])
    assert [p.rsplit("/imgs/", 1)[1] for p in folder] == ["a.png", "b.jpg", "sub/c.jpg"]
    assert list_inputs([str(tmp_path / "imgs" / "*.jpg")]) == [str(tmp_path / "imgs" / "b.jpg")]

    (tmp_path / "list.jsonl").write_text(
        json.dumps({"uri": "imgs/a.png"}) + "\n" + json.dumps("/abs/x.jpg") + "\n"
    )
    assert list_inputs([str(tmp_path / "list.jsonl")]) == [str(tmp_path / "imgs/a.png"), "/abs/x.jpg"]

    pq.write_table(pa.table({"uri": ["imgs/b.jpg", "s3://bucket/k.jpg"]}), tmp_path / "list.parquet")
    assert list_inputs([str(tmp_path / "list.parquet")]) == [
        str(tmp_path / "imgs/b.jpg"),
        "s3://bucket/k.jpg",
    ]


def test_the_same_uri_listed_twice_is_one_input(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert len(list_inputs([str(tmp_path), str(tmp_path / "a.jpg")])) == 1


def test_webdataset_shards_as_input(tmp_path):
    path = tmp_path / "in.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k1.jpg", b"one"), ("k1.json", b"{}"), ("k2.png", b"two")):
            src = tmp_path / "src"
            src.write_bytes(data)
            tar.add(src, arcname=name)
    uris = list_inputs([str(path)])
    assert uris == [f"{path}#k1.jpg", f"{path}#k2.png"]
    assert read_uri(uris[1], max_bytes=100) == b"two"


def test_missing_input_fails_fast():
    with pytest.raises(SourceError, match="matches no file"):
        list_inputs(["/nonexistent/*.jpg"])


def test_oversized_file_is_refused(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 2048)
    with pytest.raises(OSError, match="max_file_mb"):
        read_uri(str(tmp_path / "big.jpg"), max_bytes=1024)
