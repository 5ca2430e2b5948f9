"""`groundmill report`: a self-contained HTML page, checked as text and rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundmill.pipeline.cli import main
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.pipeline.report import build_report, grounded_caption_html, hex_colour, overlay
from groundmill.schema import content_key, encode_mask, new_record
from groundmill.shards import ShardWriter


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def _image_sample() -> tuple[str, bytes, dict]:
    h, w = 120, 160
    pixels = np.full((h, w, 3), 200, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    key = content_key(data)
    record = new_record(key, {"uri": "mem://grey.png", "sha256": key, "bytes": len(data), "format": "png"},
                        {"type": "image", "ext": "png", "width": w, "height": h}, [])  # fmt: skip
    record["objects"] = [
        {"id": 0, "bbox": [20, 20, 60, 60], "labels": ["ball"], "attributes": [], "score": 0.9,
         "detectors": ["test"], "segmentation": encode_mask(_disc(h, w, 40, 40, 20))},
        {"id": 1, "bbox": [90, 50, 150, 110], "labels": ["box"], "attributes": [], "score": 0.8,
         "detectors": ["test"], "segmentation": encode_mask(_disc(h, w, 120, 80, 25))},
    ]  # fmt: skip
    caption = "A red ball next to a box."
    record["captions"] = [{"text": caption, "model": "test"}]
    record["relationships"] = {
        "grounding": [
            {"phrase": "A red ball", "caption_index": 0, "tokens_positive": [0, 10], "object_ids": [0]},
            {"phrase": "a box", "caption_index": 0, "tokens_positive": [19, 24], "object_ids": [1]},
        ]
    }
    return key, data, record


def _video_sample(tmp_path: Path) -> tuple[str, bytes, dict]:
    data = write_shapes_video(tmp_path / "shapes.mp4", num_frames=8).read_bytes()
    key = content_key(data)
    h, w = 120, 160
    record = new_record(key, {"uri": "mem://shapes.mp4", "sha256": key, "bytes": len(data), "format": "mp4"},
                        {"type": "video", "ext": "mp4", "width": w, "height": h, "rotation": 0}, [])  # fmt: skip
    record["keyframes"] = [{"frame_index": i, "time_s": i / 8} for i in (0, 7)]
    record["tracks"] = [
        {
            "track_id": 3,
            "labels": ["disc"],
            "masklet": {str(f): encode_mask(_disc(h, w, 20 + f * 15, 42, 14)) for f in range(8)},
        }
    ]
    record["expressions"] = [{"track_id": 3, "expression": "the disc moving right"}]
    return key, data, record


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    writer = ShardWriter(out, name="report-test")
    for key, data, record in (_image_sample(), _video_sample(tmp_path)):
        writer.add_sample(key, data, record["media"]["ext"], record,
                          {"uri": record["source"]["uri"], "status": "ok", "timings": {"tagging": 0.5}})  # fmt: skip
    writer.add_row({"uri": "mem://broken.png", "status": "error", "error": "tagging: boom", "timings": {}})
    writer.commit()
    return out


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


def test_report_is_one_file_with_masks_phrases_and_animated_strips(run_dir: Path):
    page = build_report(run_dir)
    # Self-contained: every image is inline, nothing is fetched.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert page.count('src="data:image/jpeg;base64,') == 1  # the image sample
    gif = re.search(r'src="data:image/gif;base64,([^"]+)"', page)
    assert gif, "the video's masklets are an animated strip"
    strip = Image.open(io.BytesIO(base64.b64decode(gif.group(1))))
    assert strip.n_frames == 8
    assert hex_colour(0) in page and hex_colour(1) in page  # each phrase in its mask's colour
    assert ">A red ball</span>" in page and ">a box</span>" in page
    assert "the disc moving right" in page
    assert "tagging: boom" in page  # error counts by reason
    assert re.search(r"<td>tagging</td><td>2</td>", page)  # per-stage samples


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (CI installs it: apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path):
    assert main(["report", str(run_dir)]) == 0
    page = run_dir / "report.html"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
         page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 10, "the screenshot is blank"
    # The gallery's mask colours reached the screen (not just the text).
    red = np.array([230, 25, 75], np.float32) * 0.5 + 200 * 0.5
    assert (np.abs(pixels - red).max(axis=2) < 12).sum() > 200
