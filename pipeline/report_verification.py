"""The report's verification section: mask acceptance rates, rejection reasons, exhaustivity, hard
negatives and near-duplicates over every committed sample, and examples of rejected masks (each
drawn alone on its picture, with its label and the checks it failed)."""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from groundmill.media import decode_rgb
from groundmill.pipeline.export.common import ExportSample, iter_samples
from groundmill.schema import decode_mask, frame_records

MAX_EXAMPLES = 6


@dataclass
class VerificationSummary:
    objects: int = 0  # objects with a verification
    accepted: int = 0
    reasons: Counter = field(default_factory=Counter)
    concepts: int = 0
    not_exhaustive: int = 0
    frames: int = 0
    negatives: int = 0
    near_duplicates: int = 0
    examples: list[str] = field(default_factory=list)  # HTML cards of rejected masks

    def add(self, sample: ExportSample) -> None:
        record = sample.record
        self.near_duplicates += "near_duplicate_of" in record
        for frame in frame_records(record):
            self.frames += "negatives" in frame
            self.negatives += len(frame.get("negatives", []))
            self.concepts += len(frame.get("concepts", []))
            self.not_exhaustive += sum(not c["exhaustive"] for c in frame.get("concepts", []))
            for obj in frame.get("objects", []) + frame.get("floating_objects", []):
                v = obj.get("verification")
                if v is None:
                    continue
                self.objects += 1
                self.accepted += v["accepted"]
                self.reasons.update(r.split(" <")[0] for r in v["reasons"])
                if (
                    not v["accepted"]
                    and len(self.examples) < MAX_EXAMPLES
                    and record["media"]["type"] == "image"
                ):
                    self.examples.append(rejected_card(sample, obj))


def rejected_card(sample: ExportSample, obj: dict) -> str:
    """One rejected mask alone on its picture (the report's tint), with its label and reasons."""
    from groundmill.pipeline.report import _thumb, data_uri, overlay

    image = decode_rgb(sample.media)
    # PNG: the gallery above holds one JPEG per sample
    uri = data_uri(_thumb(overlay(image, [obj], {obj["id"]: decode_mask(obj["segmentation"])})), "PNG")
    label = obj["labels"][0] if obj["labels"] else "object"
    v = obj["verification"]
    return (
        f'<div class="card"><img src="{uri}" alt="rejected {obj["id"]}"><div class="meta">'
        f"<b>{html.escape(label)}</b> (object {obj['id']}, score {v['score']:.2f})"
        f"<br><small>{html.escape('; '.join(v['reasons']))}</small></div></div>"
    )


def verification_html(out_dir: str | Path) -> str:
    """The section, or "" when no stage verified anything."""
    s = VerificationSummary()
    for sample in iter_samples(Path(out_dir), progress=False):
        s.add(sample)
    if not (s.objects or s.frames or s.near_duplicates):
        return ""
    rate = f"{s.accepted / s.objects:.1%}" if s.objects else "n/a"
    rows = [
        ("masks verified", s.objects),
        ("accepted", f"{s.accepted} ({rate})"),
        ("rejected", s.objects - s.accepted),
        ("concepts", s.concepts),
        ("concepts not exhaustive", s.not_exhaustive),
        ("hard negatives per image", f"{s.negatives / s.frames:.1f}" if s.frames else "n/a"),
        ("near-duplicates", s.near_duplicates),
    ]
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    reasons = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td></tr>" for r, n in s.reasons.most_common())
    examples = "".join(s.examples) or "<p>none</p>"
    return (
        f'<h2>Verification</h2><table class="verification">{table}</table>'
        f"<table><tr><th>rejection reason</th><th>masks</th></tr>{reasons}</table>"
        f'<h3>Rejected masks ({len(s.examples)} shown)</h3><div class="gallery rejected">{examples}</div>'
    )
