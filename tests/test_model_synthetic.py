"""The synthetic shapes shards are in the engine's format and are not easy by construction."""

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from groundmill.media import probe_video
from groundmill.model.records import decode_video, load, mask_at
from groundmill.model.synthetic import COLOURS, HELD_OUT, SHAPES, write_split
from groundmill.schema import check_record, decode_mask, encode_mask
from groundmill.shards import iter_shard, read_index
from groundmill.tests.media_factory import h264


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_split(out, images=60, videos=16, seed=3, per_shard=40, negatives=True)
    index = read_index(out).to_pylist()
    assert len(index) == 76 and all(r["status"] == "ok" for r in index)
    found = []
    for shard in sorted({r["shard"] for r in index}):
        for key, files in iter_shard(out / shard):
            record = json.loads(files["json"])
            assert record["key"] == key and record["media"]["ext"] in files
            found.append((record, files))
    return found


def test_records_pass_the_schema_checks(samples):
    for record, _ in samples:
        assert check_record(record) == []


def test_images_are_big_enough_with_enough_kinds_of_objects(samples):
    images = [r for r, _ in samples if r["media"]["type"] == "image"]
    kinds = Counter()
    for r in images:
        assert r["media"]["width"] >= 64 and r["media"]["height"] >= 64
        assert len(r["objects"]) >= 3
        for o in r["objects"]:
            kinds[tuple(o["labels"][0].split())] += 1
    assert len({c for c, _ in kinds}) >= 4 and len({s for _, s in kinds}) == len(SHAPES) == 3


def test_a_third_of_expressions_need_colour_and_shape_together(samples):
    hard = total = 0
    for r, _ in samples:
        if r["media"]["type"] != "image":
            continue
        labels = {o["id"]: o["labels"][0].split() for o in r["objects"]}
        for ref in r["referring_expressions"]:
            colour, shape = labels[ref["object_id"]]
            others = [v for k, v in labels.items() if k != ref["object_id"]]
            hard += any(c == colour for c, _ in others) and any(s == shape for _, s in others)
            total += 1
            assert colour in ref["expression"] and shape in ref["expression"]
    assert hard / total >= 1 / 3


def test_hard_negatives_are_every_absent_training_pair_sharing_a_word(samples, tmp_path):
    images = [r for r, _ in samples if r["media"]["type"] == "image"]
    for r in images:
        present = {tuple(o["labels"][0].split()) for o in r["objects"]}
        expected = {
            f"{c} {s}" for c in COLOURS for s in SHAPES
            if (c, s) not in present and (c, s) not in HELD_OUT and any(c == pc or s == ps for pc, ps in present)
        }  # fmt: skip
        assert set(r["negatives"]) == expected and len(r["negatives"]) == len(expected)
    assert sum(len(r["negatives"]) for r in images) >= 2 * len(images)
    write_split(tmp_path, images=3, videos=0, seed=3)  # by default, none: the bench's mix
    assert not any(
        "negatives" in json.loads(f["json"]) for _, f in iter_shard(next(tmp_path.glob("*/*.tar")))
    )


def test_videos_move_and_sometimes_overlap(samples):
    videos = [(r, f) for r, f in samples if r["media"]["type"] == "video"]
    occluded = 0
    for r, files in videos:
        frames = decode_video(files["mp4"])
        assert len(frames) == r["media"]["num_frames"] >= 8 and len(r["tracks"]) >= 2
        areas = [
            [decode_mask(t["masklet"][i]["segmentation"]).sum() for i in range(len(frames))]
            for t in r["tracks"]
        ]
        centres = [np.argwhere(decode_mask(t["masklet"][0]["segmentation"])).mean(0) for t in r["tracks"]]
        last = [np.argwhere(decode_mask(t["masklet"][-1]["segmentation"])).mean(0) for t in r["tracks"]]
        assert sum(np.abs(a - b).sum() > 2 for a, b in zip(centres, last, strict=True)) >= 2  # >= 2 move
        # Overlap shows as occlusion: a track's visible area drops well below its largest.
        occluded += any(min(a) < 0.7 * max(a) for a in areas)
    assert 0 < occluded < len(videos)


def test_colours_survive_encoding(samples):
    for record, files in samples[:10] + samples[-4:]:
        _, frames = load({"json": json.dumps(record).encode(), **files}, 64)
        if record["media"]["type"] == "video":
            masks = [decode_mask(t["masklet"][0]["segmentation"]) for t in record["tracks"]]
            names = [t["labels"][0] for t in record["tracks"]]
        else:
            masks = [decode_mask(o["segmentation"]) for o in record["objects"]]
            names = [o["labels"][0] for o in record["objects"]]
        for m, name in zip(masks, names, strict=True):
            if m.sum() > 20:
                mean = frames[0][m].mean(0)
                assert np.abs(mean - COLOURS[name.split()[0]]).max() < 40, name


def test_trainer_frames_of_a_rotated_video_are_upright_like_its_masks():
    """The trainer decodes through groundmill.media with the record's rotation, so its frames are the
    upright frames the engine annotated (and its masks, in upright pixels, cover the same content)."""
    frames = [np.full((32, 64, 3), 20, np.uint8) for _ in range(3)]
    for f in frames:
        f[:, :8] = 255  # a white band on the stored frame's left edge: the bottom once upright
    data = h264(frames, [0, 40, 80], rotation=90)
    v = probe_video(data, "mp4", keyframes=1, sparse_frames=1)
    record = {"schema_version": 2, "media": {"type": "video", "ext": "mp4", "rotation": v.rotation},
              "keyframes": [{"frame_index": i} for i in range(3)]}  # fmt: skip
    _, got = load({"json": json.dumps(record).encode(), "mp4": data}, 16)
    assert len(got) == 3 and got[0].shape == (16, 16, 3)
    engine = np.asarray(Image.open(io.BytesIO(v.keyframes[0])).convert("RGB").resize((16, 16)))
    assert np.abs(got[v.keyframe_indices[0]].astype(int) - engine).mean() < 12
    band = np.zeros((64, 32), bool)
    band[-8:] = True  # where a mask of the band lies in the upright frame
    mask = mask_at(encode_mask(band), 16)
    assert got[1][mask].mean() > 200 and got[1][~mask].mean() < 80
