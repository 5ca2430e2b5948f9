"""Engine output read by the field's own tools, on one real run made here (conftest `grounded_run`):
Hugging Face `datasets` (webdataset and parquet builders), Ray's `read_webdataset`, pycocotools, and
the exports' files checked key by key against the loaders that read them (GLaMM, X2SAM, Sa2VA, GranD)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from groundmill.pipeline.cli import main
from groundmill.pipeline.export import export
from groundmill.pipeline.inspect import summarize
from groundmill.schema import SCHEMA_VERSION, SchemaVersionError, check_record, decode_mask, upgrade_record
from groundmill.shards import SHARDS_DIR, ShardWriter, read_index

pytestmark = pytest.mark.slow


def _shards(out: Path, kind: str) -> list[str]:
    return sorted(str(p) for p in (out / SHARDS_DIR).glob(f"*-{kind}-*.tar"))


def _records(out: Path) -> list[dict]:
    records = []
    for tar in sorted((out / SHARDS_DIR).glob("*.tar")):
        with tarfile.open(tar) as t:
            records += [json.load(t.extractfile(m)) for m in t if m.name.endswith(".json")]
    return records


@pytest.fixture(scope="module")
def out(grounded_run) -> Path:
    return grounded_run[0]


def test_shards_hold_one_media_kind_and_say_which(out):
    tars = sorted((out / SHARDS_DIR).glob("*.tar"))
    assert _shards(out, "image-jpg") and _shards(out, "video-mp4")
    assert len(tars) == len(_shards(out, "image-jpg")) + len(_shards(out, "video-mp4"))
    for tar in tars:
        with tarfile.open(tar) as t:
            exts = {m.name.partition(".")[2] for m in t}
        assert len(exts - {"json"}) == 1 and "json" in exts, (tar, exts)
    records = _records(out)
    assert {r["media"]["ext"] for r in records if r["media"]["type"] == "image"} == {"jpg"}  # PNG inputs too
    for r in records:
        assert r["schema_version"] == SCHEMA_VERSION and check_record(r) == []


def test_the_records_have_what_the_exports_need(out):
    records = _records(out)
    images = [r for r in records if r["media"]["type"] == "image"]
    (video,) = [r for r in records if r["media"]["type"] == "video"]
    assert any(r.get("gcg") for r in images) and any(r.get("referring_expressions") for r in images)
    assert video["tracks"] and video["expressions"]
    frames = [t["frame_index"] for t in video["frame_times"]]
    assert frames == list(range(12))  # every sampled frame, so the masklets cover them all
    assert all([m["frame_index"] for m in t["masklet"]] == frames for t in video["tracks"])


def test_duplicate_of_a_failed_input_is_an_error_with_the_reason(out, grounded_run):
    rows = {Path(r["uri"]).name: r for r in read_index(out).to_pylist()}
    original, copy = rows["broken.jpg"], rows["copy_of_broken.jpg"]
    failed, duplicate = (original, copy) if not original["duplicate_of"] else (copy, original)
    assert failed["status"] == "error" and failed["error_stage"] == "load" and failed["error_code"]
    assert duplicate["status"] == "error" and duplicate["shard"] is None
    assert duplicate["error"] == f"duplicate of {failed['uri']}: {failed['error']}"
    assert (duplicate["error_stage"], duplicate["error_code"]) == (
        failed["error_stage"],
        failed["error_code"],
    )
    assert all(r["error_stage"] is None for r in rows.values() if r["status"] == "ok")


def test_datasets_webdataset_builder_reads_every_shard(out, tmp_path):
    """`load_dataset("webdataset")` infers one type per member and per JSON key from the first samples."""
    import datasets

    images = datasets.load_dataset("webdataset", data_files={"train": _shards(out, "image-jpg")},
                                   split="train", cache_dir=str(tmp_path))  # fmt: skip
    assert images.num_rows == 3 and isinstance(images.features["jpg"], datasets.Image)
    row = images[0]
    assert row["jpg"].size == (row["json"]["media"]["width"], row["json"]["media"]["height"])
    gcg = [r["json"]["gcg"] for r in images if r["json"].get("gcg")]
    assert gcg and all(isinstance(g["groundings"], list) for g in gcg)  # not one struct keyed by phrase
    assert {g["phrase"] for x in gcg for g in x["groundings"]} == {
        g["phrase"] for r in _records(out) if r.get("gcg") for g in r["gcg"]["groundings"]
    }
    videos = datasets.load_dataset("webdataset", data_files={"train": _shards(out, "video-mp4")},
                                   split="train", cache_dir=str(tmp_path))  # fmt: skip
    (record,) = videos.select_columns(["json"])["json"]
    assert len(record["tracks"][0]["masklet"]) == 12


def test_datasets_parquet_builder_reads_the_index(out, tmp_path):
    import datasets

    parts = sorted(str(p) for p in (out / "index").glob("*.parquet"))
    index = datasets.load_dataset(
        "parquet", data_files={"train": parts}, split="train", cache_dir=str(tmp_path)
    )
    assert index.num_rows == 6
    assert {"error_stage", "error_code"} <= set(index.column_names)
    timings = [t for row in index["timings"] if row for t in row]
    assert timings and set(timings[0]) == {"stage", "seconds"}


def test_ray_read_webdataset_with_its_default_decoder(out, ray_local):
    import ray

    rows = ray.data.read_webdataset(_shards(out, "image-jpg")).take_all()
    assert len(rows) == 3
    for row in rows:
        record = row["json"]
        assert row["jpg"].shape == (record["media"]["height"], record["media"]["width"], 3)
    (video,) = ray.data.read_webdataset(_shards(out, "video-mp4")).take_all()
    assert video["json"]["media"]["type"] == "video" and len(video["mp4"]) > 0


def test_coco_export_scores_ap_one_against_itself(out, tmp_path):
    """pycocotools' COCO reads annotations.json; COCOeval of the ground truth as detections gives AP 1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dest = tmp_path / "coco"
    assert main(["export", str(out), "--format", "coco", "--output", str(dest), "--no-progress"]) == 0
    gt = COCO(str(dest / "annotations.json"))
    assert len(gt.getImgIds()) == 3 and gt.getAnnIds() and gt.loadCats(gt.getCatIds())
    for img in gt.loadImgs(gt.getImgIds()):
        assert (dest / "images" / img["file_name"]).is_file() and img["height"] and img["width"]
    for ann in gt.loadAnns(gt.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert ann["area"] == gt.annToMask(ann).sum() > 0 and ann["iscrowd"] == 0 and w > 0 and h > 0
    detections = gt.loadRes([{**a, "score": 1.0} for a in gt.dataset["annotations"]])
    for kind in ("segm", "bbox"):
        e = COCOeval(gt, detections, kind)
        e.evaluate()
        e.accumulate()
        e.summarize()
        assert e.stats[0] == pytest.approx(1.0)
    refs = json.loads((dest / "refs.json").read_text())  # RefCOCO's refs(unc).p keys, as JSON
    assert refs
    for ref in refs:
        assert {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences"} <= set(ref)
        assert gt.anns[ref["ann_id"]]["image_id"] == ref["image_id"] and ref["split"] == "train"
        assert all(s["sent"] and s["tokens"] for s in ref["sentences"])


def test_grandf_export_has_what_glamm_and_x2sam_read(out, tmp_path):
    dest = tmp_path / "grandf"
    export(out, "grandf", dest, progress=False)
    items = json.loads((dest / "annotations.json").read_text())
    assert items and len(items) == sum(1 for r in _records(out) if r.get("gcg"))
    for item in items:
        # X2SAM ImgGCGSegDataset._load_grandf_gcg: image_id, file_name, caption, height/width,
        # groundings.items() sorted by token_positives[0], each phrase found in the lowercased caption.
        assert {"image_id", "file_name", "caption", "height", "width", "groundings"} <= set(item)
        assert (dest / "images" / item["file_name"]).is_file()
        caption = item["caption"]
        for phrase, g in item["groundings"].items():
            start, end = g["token_positives"]
            assert caption[start:end] == phrase and phrase.lower() in caption.lower()
            # GLaMM GranDf_gcg_ds: a phrase's rle_masks are decoded and summed into one uint8 map.
            total = sum(mask_utils.decode(rle).astype(np.uint8) for rle in g["rle_masks"])
            assert total.shape == (item["height"], item["width"]) and 0 < total.max() <= 1


def test_grand_export_has_the_per_image_layout(out, tmp_path):
    dest = tmp_path / "grand"
    export(out, "grand", dest, progress=False)
    files = sorted((dest / "annotations").glob("*.json"))
    assert len(files) == 3
    for path in files:
        data = json.loads(path.read_text())
        ((name, entry),) = data.items()
        assert name.startswith(path.stem) and (dest / "images" / name).is_file()
        assert set(entry) == {"objects", "floating_objects", "floating_attributes", "short_captions", "captions",
                              "relationships", "dense_caption", "additional_context", "landmark"}  # fmt: skip
        # GranD's level-2 short-caption grounding reads plain-string captions and relationships.grounding.
        assert entry["captions"] and all(isinstance(c, str) for c in entry["captions"])
        for g in entry["relationships"]["grounding"]:
            assert g["phrase"] and g["object_ids"]
        # Its conversation builder reads short_captions[i] as dicts beside dense_caption.
        for sc in entry["short_captions"]:
            for d in sc["details"]:
                assert sc["caption"][slice(*d["tokens_positive"])] == d["phrase"] and d["bbox"]
        for a in entry["floating_attributes"]:
            assert {"bbox", "labels", "score", "attributes"} <= set(a)


def test_refsav_export_has_what_sa2va_reads(out, tmp_path):
    """Sa2VA03RefVOS (dataset_type='refsav'): frames read with cv2, then frames[::4]; one masklet entry
    per kept frame, the object's column int(obj_id)."""
    import cv2

    dest = tmp_path / "refsav"
    assert main(["export", str(out), "--format", "refsav", "--output", str(dest), "--no-progress"]) == 0
    meta = json.loads((dest / "meta.json").read_text())
    assert len(meta) == 1
    for info in meta.values():
        capture = cv2.VideoCapture(str(dest / info["video_path"]))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        masklet = json.loads((dest / info["anno_path"]).read_text())["masklet"]
        assert len(frames) == 12 and len(masklet) == len(frames[::4])
        for obj_id, obj in info["objects"].items():
            assert isinstance(obj["formated"], str) and obj["formated"]
            for row in masklet:
                masks = mask_utils.decode(row)  # h x w x n_objects, as Sa2VA decodes a frame's list
                assert masks.shape == (*frames[0].shape[:2], len(info["objects"]))
                assert masks[:, :, int(obj_id)].dtype == np.uint8
        assert any(mask_utils.decode(row).any() for row in masklet)


def test_hf_export_opens_with_load_dataset(out, tmp_path):
    import datasets

    dest = tmp_path / "hf"
    export(out, "hf", dest, progress=False)
    images = datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "cache"))
    assert images.num_rows == 3 and isinstance(images.features["image"], datasets.Image)
    row = images[0]
    assert row["image"].size == (row["width"], row["height"])
    assert json.loads(row["record"])["key"] == row["key"]
    assert all(0 < r["coverage"] <= 1 and isinstance(r["stuff"], list) for r in images)
    with_gcg = [r["gcg"] for r in images if r["gcg"]]
    assert with_gcg and all(isinstance(g["groundings"], list) for g in with_gcg)
    videos = datasets.load_dataset(str(dest), "videos", split="train", cache_dir=str(tmp_path / "cache"))
    assert videos.num_rows == 1 and len(videos[0]["tracks"][0]["masklet"]) == 12


def test_inspect_counts_what_the_records_hold(out):
    records = _records(out)
    frames = [f for r in records for f in (r.get("keyframes", []) if r["media"]["type"] == "video" else [r])]
    held = summarize(out)["records"]
    assert held["floating_objects"] == sum(len(f.get("floating_objects", [])) for f in frames) > 0
    assert held["masks"] > 0 and held["gcg_phrases"] > 0 and held["referring_expressions"] > 0
    assert held["tracks"] > 0 and held["masklet_frames"] > 0 and held["captions_verified"] > 0


def test_v1_records_are_read_as_v2_and_newer_ones_refused(tmp_path):
    rle = {"size": [2, 2], "counts": "04"}
    v1 = {"schema_version": 1, "key": "a" * 24, "media": {"type": "video", "width": 2, "height": 2},
          "frame_times": {"0": 0.0, "1": 0.5, "2": 1.0},
          "tracks": [{"track_id": 0, "masklet": {"1": rle}}],
          "gcg": {"caption": "a cat", "groundings": {"a cat": {"token_positives": [0, 5], "rle_masks": [rle]}}}}  # fmt: skip
    v2 = upgrade_record(v1)
    assert v2["schema_version"] == SCHEMA_VERSION
    assert [m["frame_index"] for m in v2["tracks"][0]["masklet"]] == [0, 1, 2]
    assert not decode_mask(v2["tracks"][0]["masklet"][0]["segmentation"]).any()
    assert v2["gcg"]["groundings"][0]["phrase"] == "a cat"
    with pytest.raises(SchemaVersionError, match="schema version 3"):
        upgrade_record({"schema_version": 3, "key": "b" * 24})
    writer = ShardWriter(tmp_path / "future")
    writer.add_sample("c" * 24, b"x", "jpg", {"schema_version": 3, "media": {"type": "image", "ext": "jpg"}},
                      {"uri": "f.jpg", "status": "ok", "media_type": "image"})  # fmt: skip
    writer.commit()
    assert main(["inspect", str(tmp_path / "future")]) == 2  # "groundmill: error: ... schema version 3"


def test_images_are_stored_in_the_configured_format():
    from PIL import Image as PILImage

    from groundmill.media import normalise_image
    from groundmill.tests.media_factory import rgb_jpeg
    from groundmill.tests.stage_samples import png

    limits = {"max_pixels": 10**8, "max_side": 4096}
    as_jpg = normalise_image(png(0), **limits, image_format="jpg")
    assert as_jpg.ext == "jpg" and "PNG->JPEG" in as_jpg.steps
    assert PILImage.open(io.BytesIO(as_jpg.data)).format == "JPEG"
    kept = normalise_image(png(0), **limits, image_format="png")
    assert kept.ext == "png" and kept.data == png(0) and kept.steps == []  # already right: stored as is
    assert normalise_image(rgb_jpeg(1), **limits, image_format="png").ext == "png"
    with pytest.raises(ValueError, match="image_format"):
        normalise_image(png(0), **limits, image_format="webp")
