"""The eval report: one JSON file (per-dataset metrics, counts and protocol) and the tables papers print.

Tables (values x 100): referring cIoU and gIoU with one column per split; video J&F, J, F; GCG METEOR,
CIDEr, AP50, mIoU, recall; VGD AP. Which table a split goes to follows from the metrics it has.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float))
    return path


def _pct(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _grid(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Aligned columns: the first `left` left-justified (names), the rest right-justified (numbers)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _splits(report: dict, key: str) -> list[tuple[str, str, dict]]:
    return [(name, split, m) for name, entry in report["datasets"].items()
            for split, m in entry["splits"].items() if key in m]  # fmt: skip


def referring_tables(report: dict) -> list[str]:
    rows = _splits(report, "cIoU")
    if not rows:
        return []
    cols = list(dict.fromkeys(split for _, split, _ in rows))
    out = []
    for metric in ("cIoU", "gIoU"):
        table = {name: {} for name, _, _ in rows}
        for name, split, m in rows:
            table[name][split] = _pct(m[metric])
        body = [[name, *(vals.get(c, "") for c in cols)] for name, vals in table.items()]
        out.append(f"Referring segmentation, {metric}\n" + _grid(["dataset", *cols], body))
    return out


def metric_table(report: dict, title: str, key: str, metrics: list[str]) -> list[str]:
    rows = _splits(report, key)
    if not rows:
        return []
    body = [[name, split, *(_pct(m.get(k)) for k in metrics), str(m.get("n", ""))] for name, split, m in rows]
    return [f"{title}\n" + _grid(["dataset", "split", *metrics, "n"], body, left=2)]


def format_tables(report: dict) -> str:
    parts = referring_tables(report)
    parts += metric_table(report, "Video segmentation", "J&F", ["J&F", "J", "F"])
    parts += metric_table(
        report, "Grounded conversation generation", "mIoU", ["METEOR", "CIDEr", "AP50", "mIoU", "recall"]
    )
    parts += metric_table(report, "Visual grounded segmentation", "AP", ["AP", "AP50"])
    notes = [f"[{name}] {entry['protocol']}" for name, entry in report["datasets"].items()]
    notes += [
        f"[{name}] phrase embedder: {e['phrase_embedder']}"
        for name, e in report["datasets"].items()
        if "phrase_embedder" in e
    ]
    notes += [
        f"[{name}/{split}] {m['captions_unavailable']}"
        for name, split, m in _splits(report, "captions_unavailable")
    ]
    return "\n\n".join(parts + ["\n".join(notes)])
