"""`groundmill report`: a self-contained HTML page, checked as text and rendered in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundmill.pipeline.cli import main
from groundmill.pipeline.export.common import iter_samples
from groundmill.pipeline.inspect import error_reason, summarize
from groundmill.pipeline.report import (
    MAX_STRIP_FRAMES,
    build_report,
    colour,
    grounded_caption_html,
    hex_colour,
    overlay,
    stuff_overlay,
)
from groundmill.schema import encode_mask
from groundmill.shards import read_index


@pytest.fixture()
def run_dir(grounded_run) -> Path:
    """The shared run of the real stages (conftest): images with masks and grounded captions, a video
    with tracks and expressions, error rows."""
    return grounded_run[0]


def _records(out: Path) -> list[dict]:
    return [s.record for s in iter_samples(out, progress=False)]


def test_grounded_caption_colours_each_phrase_and_escapes_text():
    out = grounded_caption_html("a <cat> and a dog", [(0, 7, 2), (12, 17, 5)])
    assert out.count('<span class="ph"') == 2
    assert f"{hex_colour(2)}" in out and f"{hex_colour(5)}" in out
    assert "&lt;cat&gt;" in out and "<cat>" not in out
    # Plain text survives: stripping tags gives the caption back (unescaped).
    assert re.sub(r"<[^>]+>", "", out).replace("&lt;", "<").replace("&gt;", ">") == "a <cat> and a dog"


def test_overlay_tints_only_the_mask():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    mask = np.zeros((10, 20), bool)
    mask[2:5, 2:5] = True
    out = np.asarray(overlay(image, [], {0: mask}))
    assert out[3, 3].tolist() != [0, 0, 0] and out[8, 15].tolist() == [0, 0, 0]


def test_stuff_is_tinted_outside_the_objects_only():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    sky, person = np.zeros((10, 20), bool), np.zeros((10, 20), bool)
    sky[:5] = True
    person[2:4, 2:4] = True
    regions = [{"id": 3, "label": "", "segmentation": encode_mask(sky)}]
    out = np.asarray(stuff_overlay(image, regions, [{"id": 0, "segmentation": encode_mask(person)}]))
    assert out[0, 19].tolist() == [int(0.35 * c) for c in colour(3)]  # the sky's tint (truncated to uint8)
    assert out[3, 3].tolist() == [0, 0, 0]  # the person's pixels are left for its own tint
    assert out[8, 15].tolist() == [0, 0, 0]


def test_report_shows_stuff_and_coverage(run_dir: Path):
    page = build_report(run_dir)
    images = [r for r in _records(run_dir) if r["media"]["type"] == "image"]
    assert images and all("stuff" in r and "coverage" in r for r in images)
    for r in images:
        assert f"{len(r['stuff'])} stuff, coverage {r['coverage']:.0%}" in page
    rows = {r["key"]: r["coverage"] for r in read_index(run_dir, ["key", "coverage"]).to_pylist()}
    assert all(rows[r["key"]] == r["coverage"] for r in images)  # the index row holds the record's coverage
    coverages = [c for c in rows.values() if c is not None]
    assert f"mean coverage {np.mean(coverages):.1%}" in page
    assert any(o["segmentation_source"] == "SAM2-auto" for r in images for o in r["floating_objects"])


def test_report_is_one_file_with_masks_phrases_and_animated_strips(run_dir: Path):
    page = build_report(run_dir)
    records = _records(run_dir)
    images = [r for r in records if r["media"]["type"] == "image"]
    (video,) = [r for r in records if r["media"]["type"] == "video"]
    # Self-contained: every image is inline, nothing is fetched.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert page.count('src="data:image/jpeg;base64,') == len(images)
    gif = re.search(r'src="data:image/gif;base64,([^"]+)"', page)
    assert gif, "the video's masklets are an animated strip"
    strip = Image.open(io.BytesIO(base64.b64decode(gif.group(1))))
    covered = {m["frame_index"] for t in video["tracks"] for m in t["masklet"]
               if t["first_frame"] <= m["frame_index"] <= t["last_frame"]}  # fmt: skip
    assert strip.n_frames == min(len(covered), MAX_STRIP_FRAMES)
    # Every grounded phrase of the short captions is shown in its object's colour.
    for r in images:
        for g in r["relationships"]["grounding"]:
            assert f">{html.escape(g['phrase'])}</span>" in page and hex_colour(g["object_ids"][0]) in page
        for ref in r.get("referring_expressions", [])[:8]:
            assert html.escape(ref["expression"]) in page
    # All three levels of every track's video expressions, as the stage wrote them.
    assert video["expressions"]
    for e in video["expressions"]:
        for level in ("object_level", "scene_level", "video_level"):
            assert html.escape(e[level]) in page
    rows = read_index(run_dir).to_pylist()
    for r in rows:
        if r["error"]:
            assert html.escape(error_reason(r["error"])) in page  # error counts by reason
    masks = summarize(run_dir)["records"]["masks"]
    assert re.search(rf"<td>masks</td><td>{masks}</td>", page) and masks > 0
    timed = sum(1 for r in rows if any(t["stage"] == "masks" for t in r["timings"] or []))
    assert re.search(rf"<td>masks</td><td>{timed}</td><td>", page)  # per-stage samples


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (CI installs it: apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path):
    page = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--output", str(page)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
         page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2400, 1200)  # tall enough to reach the gallery below the summaries
    assert pixels.std() > 10, "the screenshot is blank"
    # The gallery's object colours reached the screen: box outlines and phrases in the pure colour,
    # and mask tints (the real stages' random-weight SAM2 masks are a few pixels each, so few of those).
    red = np.array([230, 25, 75], np.float32)
    assert (np.abs(pixels - red).max(axis=2) < 12).sum() > 200
    tint = red * 0.5 + 200 * 0.5
    assert (np.abs(pixels - tint).max(axis=2) < 12).sum() > 0


def test_report_shows_acceptance_rates_and_rejected_masks(run_dir: Path):
    """The verification section counts every verified object of the run and draws rejected masks."""
    page = build_report(run_dir)
    objects = [o for r in _records(run_dir) for f in ([r] if r["media"]["type"] == "image" else r["keyframes"])
               for o in f.get("objects", []) + f.get("floating_objects", [])]  # fmt: skip
    verified = [o for o in objects if "verification" in o]
    assert verified and len(verified) == len([o for o in objects if "segmentation" in o])
    accepted = sum(o["verification"]["accepted"] for o in verified)
    assert f"<td>masks verified</td><td>{len(verified)}</td>" in page
    assert f"<td>accepted</td><td>{accepted} (" in page
    images = [r for r in _records(run_dir) if r["media"]["type"] == "image"]
    rejected = [
        o
        for r in images
        for o in r["objects"] + r["floating_objects"]
        if "segmentation" in o and not o["verification"]["accepted"]
    ]
    assert page.count('alt="rejected ') == min(6, len(rejected))
    if rejected:
        assert html.escape(rejected[0]["verification"]["reasons"][0]) in page
