"""`groundmill report OUT_DIR`: one self-contained HTML page about a run.

The page holds per-stage throughput and error counts (from the index and run.json) and a gallery
of samples read back from the shards: stuff regions (sky, grass...) tinted and named under the
object masks drawn over each image, each image's coverage (objects and stuff), the grounded caption with every
phrase in its mask's colour, the referring expressions, and each video's masklets drawn over the
frames they cover as an animated strip (an inline GIF) with the tracks' object-, scene- and
video-level expressions. What the records hold overall (objects, masks, GCG phrases, tracks,
verification, LLM drops) comes from `inspect`. Every image is a data URI, so the page is one file
that can be mailed or attached to CI. Records of schema v1 are read as v2.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from groundmill.media import decode_rgb
from groundmill.media import video_frames as upright_frames
from groundmill.pipeline.export.common import ExportSample, iter_samples
from groundmill.pipeline.inspect import summarize
from groundmill.pipeline.report_verification import verification_html
from groundmill.pipeline.run import RUN_RECORD
from groundmill.schema import Record, decode_mask, frame_records, masklet_by_frame
from groundmill.shards import read_index

# Distinct, readable colours; object id i gets PALETTE[i % len].
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
]  # fmt: skip
THUMB_SIDE = 360  # longest side of gallery images, pixels
MAX_STRIP_FRAMES = 12  # frames per video masklet animation
MASK_ALPHA = 0.5
STUFF_ALPHA = 0.35  # stuff regions are tinted more lightly than objects, and only outside them


def colour(object_id: int) -> tuple[int, int, int]:
    return PALETTE[object_id % len(PALETTE)]


def hex_colour(object_id: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour(object_id))


def overlay(image: Image.Image, objects: list[dict[str, Any]], masks: dict[int, np.ndarray]) -> Image.Image:
    """The image with each object's mask tinted in its colour and its box outlined."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for obj_id, mask in masks.items():
        if mask.shape == canvas.shape[:2]:
            canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * np.array(colour(obj_id))
    out = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        draw.rectangle([x0, y0, x1, y1], outline=colour(obj["id"]), width=2)
        label = (obj.get("labels") or [""])[0]
        if label:
            draw.text((x0 + 3, y0 + 2), label, fill=colour(obj["id"]))
    return out


def stuff_overlay(
    image: Image.Image, regions: list[dict[str, Any]], objects: list[dict[str, Any]]
) -> Image.Image:
    """The image with each stuff region tinted in its colour where no object mask lies, and named
    at the centre of its box."""
    if not regions:
        return image
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    free = np.ones(canvas.shape[:2], bool)
    for mask in _masks(objects).values():
        if mask.shape == free.shape:
            free &= ~mask
    named = []
    for region in regions:
        mask = decode_mask(region["segmentation"])
        if mask.shape != free.shape or not mask.any():
            continue
        paint = mask & free
        canvas[paint] = (1 - STUFF_ALPHA) * canvas[paint] + STUFF_ALPHA * np.array(colour(region["id"]))
        ys, xs = np.nonzero(mask)
        named.append(((int(xs.min() + xs.max()) // 2, int(ys.min() + ys.max()) // 2), region))
    out = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for (x, y), region in named:
        draw.text(
            (x, y), region["label"], fill=(255, 255, 255), stroke_width=1, stroke_fill=colour(region["id"])
        )
    return out


def coverage_text(record: Record) -> str:
    coverage = record.get("coverage")
    return f", coverage {coverage:.0%}" if coverage is not None else ""


def mean_coverage(out: Path) -> float | None:
    """The mean of the index's per-input coverage (None when no row has one: older outputs)."""
    values = [v for v in read_index(out, ["coverage"]).column("coverage").to_pylist() if v is not None]
    return float(np.mean(values)) if values else None


def _thumb(image: Image.Image) -> Image.Image:
    image = image.copy()
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return image


def data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def animated_uri(frames: list[Image.Image], frame_ms: int = 400) -> str:
    """Frames -> an inline looping GIF."""
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return f"data:image/gif;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def grounded_caption_html(caption: str, spans: list[tuple[int, int, int]]) -> str:
    """A caption with each (start, end, object_id) span wrapped in its object's colour.

    Overlapping spans keep the first; the text outside spans is escaped unchanged.
    """
    parts, pos = [], 0
    for start, end, obj_id in sorted(spans):
        if start < pos or end <= start:
            continue
        parts.append(html.escape(caption[pos:start]))
        parts.append(
            f'<span class="ph" style="background:{hex_colour(obj_id)}55;border-bottom:3px solid '
            f'{hex_colour(obj_id)}">{html.escape(caption[start:end])}</span>'
        )
        pos = end
    parts.append(html.escape(caption[pos:]))
    return "".join(parts)


def frame_caption_html(frame: dict[str, Any]) -> str:
    """The grounded captions of one image: GranD's dense caption first, then the short captions."""
    blocks = []
    dense = frame.get("dense_caption")
    if dense and dense.get("caption"):
        spans = [(*d["tokens_positive"], d["ids"][0]) for d in dense.get("details", []) if d.get("ids")]
        blocks.append(grounded_caption_html(dense["caption"], spans))
    captions = frame.get("captions", [])
    grounding = frame.get("relationships", {}).get("grounding", [])
    for i, cap in enumerate(captions):
        spans = [
            (*g["tokens_positive"], g["object_ids"][0])
            for g in grounding
            if g["caption_index"] == i and g["object_ids"]
        ]
        blocks.append(grounded_caption_html(cap["text"], spans))
    return "".join(f'<p class="cap">{b}</p>' for b in blocks)


def _masks(objects: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    return {o["id"]: decode_mask(o["segmentation"]) for o in objects if o.get("segmentation")}


def _objects(frame: dict[str, Any]) -> list[dict[str, Any]]:
    return list(frame.get("objects", [])) + list(frame.get("floating_objects", []))


def video_frames(data: bytes, indices: set[int], rotation: int = 0) -> dict[int, Image.Image]:
    """Decode only the frames at `indices` (upright) from a stored video, through the foundation's
    allowlisted demuxers."""
    return dict(upright_frames(data, rotation, indices)) if indices else {}


def _spaced(items: list[int], k: int) -> list[int]:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def video_strip(record: Record, data: bytes) -> str | None:
    """An animated GIF of the video's masklets (or, without tracks, its annotated keyframes)."""
    rotation = record["media"].get("rotation", 0)
    tracks = record.get("tracks", [])
    if tracks:
        # The frames the masklets cover: from each track's first to its last visible frame.
        covered = {
            m["frame_index"]
            for t in tracks
            for m in t["masklet"]
            if t["first_frame"] <= m["frame_index"] <= t["last_frame"]
        }
        indices = _spaced(sorted(covered), MAX_STRIP_FRAMES)
        decoded = video_frames(data, set(indices), rotation)
        by_frame = {t["track_id"]: masklet_by_frame(t) for t in tracks}
        frames = []
        for i in indices:
            if i not in decoded:
                continue
            masks = {tid: decode_mask(m[i]) for tid, m in by_frame.items() if i in m}
            frames.append(_thumb(overlay(decoded[i], [], masks)))
    else:
        keyframes = frame_records(record)
        decoded = video_frames(data, {k["frame_index"] for k in keyframes}, rotation)
        frames = [
            _thumb(overlay(decoded[k["frame_index"]], _objects(k), _masks(_objects(k))))
            for k in keyframes
            if k["frame_index"] in decoded
        ]
    return animated_uri(frames) if frames else None


LEVEL_NAMES = {"object_level": "looks", "scene_level": "where", "video_level": "moves"}


def expressions_html(record: Record) -> str:
    """Each track's expressions at the three levels, in the track's masklet colour."""
    rows = []
    for e in record.get("expressions", [])[:6]:
        levels = "".join(
            f"<br><small>{name}:</small> {html.escape(e[level])}"
            for level, name in LEVEL_NAMES.items()
            if e.get(level)
        )
        rows.append(f'<p class="cap"><span class="ph" style="border-bottom:3px solid {hex_colour(e["track_id"])}">'
                    f"track {e['track_id']}</span>{levels}</p>")  # fmt: skip
    return "".join(rows)


def referring_html(frame: dict[str, Any]) -> str:
    refs = frame.get("referring_expressions", [])[:8]
    items = "".join(
        f'<li><span class="ph" style="border-bottom:3px solid {hex_colour(r["object_id"])}">'
        f"{html.escape(r['expression'])}</span></li>"
        for r in refs
    )
    return f'<ul class="refs">{items}</ul>' if items else ""


def sample_card(sample: ExportSample) -> str:
    key, record, data = sample.key, sample.record, sample.media
    media = record["media"]
    tags = (
        ", ".join(t["label"] for t in frame_records(record)[0].get("tags", []))
        if frame_records(record)
        else ""
    )
    if media["type"] == "video":
        uri = video_strip(record, data)
        captions = "".join(frame_caption_html(k) for k in frame_records(record)[:1])
        body = captions + expressions_html(record)
        kind = f"video {media['width']}x{media['height']}, {len(record.get('tracks', []))} tracks"
    else:
        objects, stuff = _objects(record), record.get("stuff", [])
        picture = stuff_overlay(decode_rgb(data), stuff, objects)
        uri = data_uri(_thumb(overlay(picture, objects, _masks(objects))))
        body = frame_caption_html(record) + referring_html(record)
        kind = (
            f"image {media['width']}x{media['height']}, {len(record.get('objects', []))} objects, "
            f"{len(record.get('floating_objects', []))} floating, {len(stuff)} stuff"
            f"{coverage_text(record)}"
        )
    img = f'<img src="{uri}" alt="{key}">' if uri else '<div class="noimg">no frames</div>'
    return (
        f'<div class="card">{img}<div class="meta"><b>{html.escape(key)}</b> - {html.escape(kind)}'
        f"<br><small>{html.escape(record['source']['uri'])}</small>"
        f"<br><small>tags: {html.escape(tags)}</small></div>{body}</div>"
    )


def stage_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: samples, busy seconds, samples/s per worker, and errors raised by that stage."""
    errors = dict(summary["errors_by_stage"])
    rows = []
    for name, s in summary["stages"].items():
        rate = s["samples"] / s["seconds"] if s["seconds"] else float("inf")
        rows.append({"stage": name, **s, "samples_per_s": rate, "errors": errors.pop(name, 0)})
    rows += [
        {"stage": n, "samples": 0, "seconds": 0.0, "samples_per_s": 0.0, "errors": e}
        for n, e in errors.items()
    ]
    return rows


def build_report(out_dir: str | Path, max_samples: int = 24) -> str:
    """The HTML page for an output directory."""
    out = Path(out_dir)
    summary = summarize(out)
    run = json.loads((out / RUN_RECORD).read_text()) if (out / RUN_RECORD).exists() else {}
    wall = sum(a.get("seconds", 0.0) for a in run.get("attempts", []))
    stage_table = "".join(
        f"<tr><td>{html.escape(r['stage'])}</td><td>{r['samples']}</td><td>{r['seconds']:.2f}</td>"
        f'<td>{r["samples_per_s"]:.2f}</td><td class="{"bad" if r["errors"] else ""}">{r["errors"]}</td></tr>'
        for r in stage_rows(summary)
    )
    error_table = "".join(
        f"<tr><td>{html.escape(reason)}</td><td>{n}</td></tr>"
        for reason, n in summary["errors_by_reason"].items()
    )
    cards = []
    for sample in iter_samples(out, progress=False):
        if len(cards) >= max_samples:
            break
        cards.append(sample_card(sample))
    contents = "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in summary["records"].items())  # fmt: skip
    random_note = (
        f'<p class="bad">RANDOM-WEIGHT models (annotations are not real): {html.escape(", ".join(summary["random_weight_models"]))}</p>'
        if summary["random_weight_models"]
        else ""
    )
    throughput = f"{summary['inputs'] / wall:.2f} inputs/s over {wall:.1f} s" if wall else "n/a"
    coverage = mean_coverage(out)
    coverage_note = (
        f"; mean coverage {coverage:.1%} of pixels (objects and stuff)" if coverage is not None else ""
    )
    verification = verification_html(out)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>groundmill run report: {html.escape(out.name)}</title>
<style>
body{{font-family:sans-serif;margin:20px;background:#fafafa;color:#222}}
table{{border-collapse:collapse;margin:8px 0}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} .bad{{color:#b00;font-weight:bold}}
.gallery{{display:flex;flex-wrap:wrap;gap:12px}}
.card{{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:{THUMB_SIDE}px}}
.card img{{max-width:100%;display:block}} .meta{{font-size:13px;margin:4px 0}}
.cap{{font-size:14px;line-height:1.6}} .ph{{padding:0 2px;border-radius:3px}}
.noimg{{height:80px;background:#eee}}
</style></head><body>
<h1>groundmill run report</h1>
<p>{html.escape(str(out))}: run <b>{html.escape(summary["status"])}</b>; inputs {summary["inputs"]},
samples {summary["samples"]}, duplicates {summary["duplicates"]}, errors {summary["errors"]},
objects {summary["objects"]}, shards {summary["shards"]} ({summary["shard_bytes"] / 2**20:.1f} MiB);
throughput {throughput}{coverage_note}.</p>
{random_note}
<h2>Stages</h2>
<table><tr><th>stage</th><th>samples</th><th>busy s</th><th>samples/s per worker</th><th>errors</th></tr>{stage_table}</table>
<h2>Records</h2>
<table>{contents}</table>
<h2>Errors by reason</h2>
<table><tr><th>reason</th><th>inputs</th></tr>{error_table or '<tr><td colspan="2">none</td></tr>'}</table>
<h2>Samples ({len(cards)} shown)</h2>
<div class="gallery">{"".join(cards)}</div>
{verification}
</body></html>
"""


def write_report(out_dir: str | Path, dest: str | Path | None = None, max_samples: int = 24) -> Path:
    """Write the report (default: OUT_DIR/report.html) and return its path."""
    path = Path(dest) if dest else Path(out_dir) / "report.html"
    path.write_text(build_report(out_dir, max_samples), encoding="utf-8")
    return path
