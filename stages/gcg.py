"""GCG export: the verified, grounded dense caption in GranD-f's training form.

    gcg = {"file_name": "<key>.<ext>", "caption": str,
           "groundings": [{"phrase", "tokens_positive": [start, end], "object_ids", "rle_masks": [RLE]}]}

(schema.GCG: a list, so no key depends on the data; `groundmill export --format grandf` writes
GranD-f's phrase-keyed dict from it.) Only phrases whose objects all have masks are exported, so every
phrase maps to masks (an object's, or a stuff region's: "the sky"), and every span indexes the
caption exactly (checked here, not assumed). With `verified_only` (the default) a phrase grounded
to an object the mask verifier rejected is dropped from the dense caption's details and from GCG.
A phrase text that occurs twice keeps its first grounding: GranD-f keys groundings by phrase.

With `rewrite: true` the LLM rewrites each GCG caption to be concise (GranD-f's GPT-4 rewrite step)
from a copy whose grounded phrases are marked `<p>phrase</p>`; the rewrite is kept only if every
marked phrase survives verbatim and nothing else is marked, so spans and masks stay exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

from groundmill.schema import GCG, FrameRecord, GCGGrounding, is_verified
from groundmill.stages.base import Sample
from groundmill.stages.llm import Generation, require_stop
from groundmill.stages.llm.parsing import clean_text
from groundmill.stages.llm.stage import LLMStage

_MARK = re.compile(r"<p>(.*?)</p>")


def drop_rejected_details(frame: FrameRecord) -> int:
    """Remove the dense caption's phrases grounded to an object the mask verifier rejected; how many."""
    dense = frame.get("dense_caption")
    if not dense:
        return 0
    rejected = {
        o["id"] for o in frame.get("objects", []) + frame.get("floating_objects", []) if not is_verified(o)
    }
    kept = [d for d in dense["details"] if not rejected.intersection(d["ids"])]
    dropped, dense["details"] = len(dense["details"]) - len(kept), kept
    return dropped


def gcg_record(file_name: str, frame: FrameRecord, verified_only: bool = True) -> GCG | None:
    """The GCG sample of an image record, or None without an accepted, grounded dense caption.
    `verified_only`: only objects the mask verifier accepted (or that no verifier saw) ground phrases."""
    dense = frame.get("dense_caption")
    if not dense or not dense.get("verification", {}).get("accepted"):
        return None
    caption = dense["caption"]
    masks = {
        o["id"]: o["segmentation"]
        for o in frame.get("objects", []) + frame.get("floating_objects", []) + frame.get("stuff", [])
        if "segmentation" in o and (is_verified(o) or not verified_only)
    }  # stuff region ids follow the objects', so one id space covers both; stuff has no verifier
    groundings: list[GCGGrounding] = []
    for d in dense["details"]:
        start, end = d["tokens_positive"]
        if any(g["phrase"] == d["phrase"] for g in groundings) or caption[start:end] != d["phrase"]:
            continue
        if d["ids"] and all(i in masks for i in d["ids"]):
            groundings.append(
                GCGGrounding(
                    phrase=d["phrase"],
                    tokens_positive=[start, end],
                    object_ids=list(d["ids"]),
                    rle_masks=[masks[i] for i in d["ids"]],
                )
            )
    if not groundings:
        return None
    return GCG(file_name=file_name, caption=caption, groundings=groundings)


def mark_phrases(gcg: GCG) -> str:
    """The caption with each grounded phrase wrapped as `<p>phrase</p>` (overlapping spans skipped)."""
    caption, out, pos = gcg["caption"], [], 0
    for g in sorted(gcg["groundings"], key=lambda g: g["tokens_positive"][0]):
        start, end = g["tokens_positive"]
        if start >= pos:
            out += [caption[pos:start], f"<p>{g['phrase']}</p>"]
            pos = end
    return "".join(out) + caption[pos:]


def parse_marked(text: str, phrases: set[str]) -> tuple[str, dict[str, list[int]]]:
    """A rewritten marked caption -> (plain caption, first span of each phrase). Raises ValueError
    unless exactly the given phrases are marked, each verbatim."""
    caption, spans, pos = [], {}, 0
    length = 0
    for m in _MARK.finditer(text):  # `length` tracks the plain caption's length so far
        phrase = m.group(1)
        if phrase not in phrases:
            raise ValueError(f"marked phrase {phrase!r} is not one of the grounded phrases")
        caption.append(text[pos : m.start()])
        length += m.start() - pos
        spans.setdefault(phrase, [length, length + len(phrase)])
        caption.append(phrase)
        length += len(phrase)
        pos = m.end()
    caption.append(text[pos:])
    plain = "".join(caption)
    if "<p>" in plain or "</p>" in plain:
        raise ValueError("unbalanced <p> marks")
    missing = phrases - set(spans)
    if missing:
        raise ValueError(f"rewrite lost grounded phrase(s) {sorted(missing)}")
    return plain, spans


def parse_rewrite(gen: Generation, phrases: set[str]) -> tuple[str, dict[str, list[int]]]:
    return parse_marked(clean_text(require_stop(gen)), phrases)


def apply_rewrite(frame: FrameRecord, rewrite: tuple[str, dict[str, list[int]]]) -> None:
    caption, spans = rewrite
    gcg = frame["gcg"]
    gcg["caption"] = caption
    # Phrases left unmarked (their spans overlapped a marked one) have no span in the new caption.
    gcg["groundings"] = [g for g in gcg["groundings"] if g["phrase"] in spans]
    for g in gcg["groundings"]:
        g["tokens_positive"] = spans[g["phrase"]]


class GCGExport(LLMStage):
    name = "gcg"
    provides = ("gcg",)
    requires = ("dense_caption",)
    uses = ("objects.verification",)
    prompt_name = "gcg_rewrite"

    @dataclass
    class Params(LLMStage.Params):
        rewrite: bool = False  # the optional LLM rewrite (needs the stage's model)
        max_new_tokens: int = 128
        on_failure: str = "drop"  # a failed rewrite keeps the exported record as it was
        verified_only: bool = True  # phrases of objects the mask verifier rejected leave details and GCG

    def uses_llm(self) -> bool:
        return self.params.rewrite

    def process(self, samples: list[Sample]) -> None:
        exported = []
        for sample in samples:
            record = sample.record
            if record["media"]["type"] != "image":  # GranD-f's GCG form is per image
                continue
            if self.params.verified_only:
                sample.stats["gcg.rejected_phrases"] = float(drop_rejected_details(record))
            gcg = gcg_record(f"{sample.key}.{record['media']['ext']}", record, self.params.verified_only)
            if gcg is not None:
                record["gcg"] = gcg
                sample.stats["gcg.phrases"] = float(len(gcg["groundings"]))
                exported.append(sample)
        if self.params.rewrite and exported:
            marked = [mark_phrases(s.record["gcg"]) for s in exported]
            jobs = [
                (s, s.record, self.prompt.render(caption=m)) for s, m in zip(exported, marked, strict=True)
            ]
            parsers = [partial(parse_rewrite, phrases=set(_MARK.findall(m))) for m in marked]
            self.run_jobs(jobs, parsers, apply_rewrite)
