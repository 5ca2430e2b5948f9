"""The benchmark layout readers on tiny files written in each layout (tests/benchmark_files.py)."""

import numpy as np
import pytest

from groundmill.model.evalsets import read_layout
from groundmill.tests.benchmark_files import (
    VID_T,
    box,
    write_davis,
    write_grandf,
    write_reasonseg,
    write_refcoco,
    write_rvos,
)


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+", "refcocog"])
@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_refcoco_reads_every_sentence_of_the_eval_splits(tmp_path, dataset, fmt):
    masks = write_refcoco(tmp_path, dataset, fmt)
    items = list(read_layout(dataset, tmp_path / dataset))
    # Default splits: val and the test splits; the train ref is left out. One item per sentence.
    expected = [("the left box", ("val",), 11), ("small box", ("val",), 11)]
    if dataset != "refcocog":  # refcocog's eval splits are val and test, so its testA ref is not read
        expected.append(("box on the right", ("testA",), 12))
    assert [(it.text, it.groups) for it in items] == [(t, g) for t, g, _ in expected]
    for it, (_, _, ann) in zip(items, expected, strict=True):
        assert it.mask.shape == (20, 30) and np.array_equal(it.mask, masks[ann])
        assert it.image.exists() and it.ignore is None
    assert [it.text for it in read_layout(dataset, tmp_path / dataset, ["train"])] == ["training only"]


def test_refcoco_pickle_is_refused_with_the_conversion(tmp_path):
    write_refcoco(tmp_path, "refcoco", "pickle")
    with pytest.raises(ValueError, match=r"pickle.*refs\(unc\)\.json") as err:
        list(read_layout("refcoco", tmp_path / "refcoco"))
    assert "pickle module (encoding='latin1') and json.dump" in str(err.value)  # how to convert


def test_refcoco_images_folder_is_found_or_named(tmp_path):
    write_refcoco(tmp_path, "refcoco")
    (tmp_path / "images").rename(tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match="--images"):
        list(read_layout("refcoco", tmp_path / "refcoco"))
    assert len(list(read_layout("refcoco", tmp_path / "refcoco", images=tmp_path / "coco"))) == 3


def test_reasonseg_first_query_ignore_region_and_query_kinds(tmp_path):
    write_reasonseg(tmp_path)
    val, test = list(read_layout("reasonseg", tmp_path))
    assert val.text == "what holds the tea?" and val.groups == ("val",)
    # The large ignore square is drawn first, the small target on top; the flag shape is skipped.
    assert np.array_equal(val.mask, box(20, 30, 4, 9, 4, 9))
    assert np.array_equal(val.ignore, box(20, 30, 0, 20, 0, 20) & ~val.mask)
    assert not val.ignore[:, 20:].any()
    assert test.groups == ("test", "test/long") and np.array_equal(test.mask, box(16, 16, 2, 7, 2, 11))


def test_grandf_gcg_items(tmp_path):
    masks = write_grandf(tmp_path)
    (item,) = read_layout("grandf", tmp_path)
    assert (item.image_id, item.height, item.width, item.groups) == (7, 24, 32, ("val",))
    assert item.labels == ["A red kite", "a green field"] and item.captions[0].startswith("A red kite")
    assert len(item.annotations) == len(masks) and item.image.exists()


def test_ref_youtube_vos_expressions_and_png_masks(tmp_path):
    labels = write_rvos(tmp_path)
    items = list(read_layout("refytvos", tmp_path))
    assert [it.key for it in items] == ["vid1_0", "vid1_1"]
    moving, still = items
    assert moving.targets[0].text == "the moving square" and moving.scored == list(range(VID_T))
    assert all(np.array_equal(m, lab == 1) for m, lab in zip(moving.targets[0].masks, labels, strict=True))
    assert all(np.array_equal(m, lab == 2) for m, lab in zip(still.targets[0].masks, labels, strict=True))
    assert len(moving.frames) == VID_T and all(f.exists() for f in moving.frames) and not moving.exclusive


def test_mevis_mask_dict_unions_objects_and_reads_missing_frames_as_empty(tmp_path):
    labels = write_rvos(tmp_path, mevis=True)
    one, both = list(read_layout("mevis", tmp_path))
    assert one.groups == ("valid_u",)
    assert all(np.array_equal(m, lab == 1) for m, lab in zip(one.targets[0].masks, labels, strict=True))
    # Object 2's annotation is None on frame 0: the union there is object 1 alone.
    assert np.array_equal(both.targets[0].masks[0], labels[0] == 1)
    assert all(
        np.array_equal(m, lab > 0) for m, lab in zip(both.targets[0].masks[1:], labels[1:], strict=True)
    )


def test_davis_semi_supervised_objects_void_and_scored_frames(tmp_path):
    labels = write_davis(tmp_path)
    (item,) = read_layout("davis17", tmp_path)
    assert item.key == "seq1" and item.exclusive and item.scored == [1, 2]  # first and last frames excluded
    assert len(item.targets) == 2  # ids 1..max of the first annotation; 255 is not an object
    for k, target in enumerate(item.targets, start=1):
        assert target.text is None and np.array_equal(target.prompt, np.where(labels[0] == k, True, False))
        first_row_void = [lab.copy() for lab in labels]
        for lab in first_row_void:
            lab[0, :] = 0  # the void row reads as background
        assert all(np.array_equal(m, lab == k) for m, lab in zip(target.masks, first_row_void, strict=True))


def test_unknown_layout_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark layout 'coco'"):
        read_layout("coco", tmp_path)
