"""Referring expressions: per object, a short phrase that singles it out among the image's objects.

Candidates go from least to most specific: the label; label + one attribute; label + all
attributes; label + a scene-graph relation ("the cup on the table"); label + attributes + relation;
label + an extreme position among same-label objects ("the leftmost dog"). The first candidate that
fits no other object is kept; an object for which every candidate also fits another gets none.
An optional LLM paraphrase must keep every distinguishing word, or the template stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from groundmill.schema import FrameRecord, is_verified
from groundmill.stages.base import Sample
from groundmill.stages.llm import generate_checked
from groundmill.stages.llm.parsing import parse_phrase
from groundmill.stages.llm.stage import LLMStage
from groundmill.stages.scene_graph import area

# position word -> the box score its object maximises among objects with the same label
POSITIONS: dict[str, Callable[[list[float]], float]] = {
    "leftmost": lambda b: -(b[0] + b[2]),
    "rightmost": lambda b: b[0] + b[2],
    "topmost": lambda b: -(b[1] + b[3]),
    "bottommost": lambda b: b[1] + b[3],
    "largest": area,
    "smallest": lambda b: -area(b),
}


@dataclass(frozen=True)
class ExpressionSpec:
    label: str
    attributes: tuple[str, ...] = ()
    relation: tuple[str, str] | None = None  # (predicate, other object's label)
    position: str | None = None

    def text(self) -> str:
        words = ["the"] + ([self.position] if self.position else []) + list(self.attributes) + [self.label]
        if self.relation:
            words += [self.relation[0], "the", self.relation[1]]
        return " ".join(words)

    def required_words(self) -> list[str]:
        """Words a paraphrase must keep to stay as specific."""
        words = [self.label, *self.attributes] + ([self.position] if self.position else [])
        return words + ([self.relation[1]] if self.relation else [])


def fits(
    spec: ExpressionSpec, node: dict[str, Any], nodes: list[dict[str, Any]], relations: list[dict]
) -> bool:
    """Whether the expression describes `node` (it may describe others too)."""
    if node["label"] != spec.label or not set(spec.attributes) <= set(node["attributes"]):
        return False
    if spec.relation:
        labels = {n["id"]: n["label"] for n in nodes}
        predicate, other = spec.relation
        if not any(
            r["subject"] == node["id"] and r["predicate"] == predicate and labels[r["object"]] == other
            for r in relations
        ):
            return False
    if spec.position:
        key = POSITIONS[spec.position]
        same = [n for n in nodes if n["label"] == spec.label]
        best = max(key(n["bbox"]) for n in same)
        return key(node["bbox"]) == best and sum(key(n["bbox"]) == best for n in same) == 1
    return True


def candidates(
    node: dict[str, Any], nodes: list[dict[str, Any]], relations: list[dict]
) -> list[ExpressionSpec]:
    label, attrs = node["label"], tuple(node["attributes"])
    labels = {n["id"]: n["label"] for n in nodes}
    rels = [(r["predicate"], labels[r["object"]]) for r in relations if r["subject"] == node["id"]]
    rels.sort(
        key=lambda rel: rel[1] == label
    )  # "the cup on the table" reads better than "the cup near the cup"
    out = [ExpressionSpec(label)]
    out += [ExpressionSpec(label, (a,)) for a in attrs]
    if len(attrs) > 1:
        out.append(ExpressionSpec(label, attrs))
    out += [ExpressionSpec(label, relation=rel) for rel in rels]
    if attrs:
        out += [ExpressionSpec(label, attrs, rel) for rel in rels]
    out += [ExpressionSpec(label, position=p) for p in POSITIONS]
    return out


def unique_expression(
    node: dict[str, Any], nodes: list[dict[str, Any]], relations: list[dict]
) -> ExpressionSpec | None:
    """The least specific candidate that fits `node` and no other object."""
    for spec in candidates(node, nodes, relations):
        if fits(spec, node, nodes, relations) and not any(
            fits(spec, other, nodes, relations) for other in nodes if other["id"] != node["id"]
        ):
            return spec
    return None


def keeps_meaning(paraphrase: str, spec: ExpressionSpec) -> bool:
    words = paraphrase.lower()
    return all(w.lower() in words for w in spec.required_words())


def rejected_ids(frame: FrameRecord) -> set[int]:
    """Ids of the objects the mask verifier rejected (they stay distractors, never targets)."""
    return {
        o["id"] for o in frame.get("objects", []) + frame.get("floating_objects", []) if not is_verified(o)
    }


class ReferringExpressions(LLMStage):
    name = "refexp"
    provides = ("referring_expressions",)
    requires = ("scene_graph",)
    uses = ("objects.verification",)
    prompt_name = "referring_expression"

    @dataclass
    class Params(LLMStage.Params):
        paraphrase: bool = (
            False  # rewrite templates with the LLM (kept only if no distinguishing word is lost)
        )
        max_objects: int = 30  # per image, in scene-graph order
        max_new_tokens: int = 24
        verified_only: bool = True  # no expression for an object the mask verifier rejected

    def uses_llm(self) -> bool:
        return self.params.paraphrase

    def process(self, samples: list[Sample]) -> None:
        pending = []  # (sample, expression entry, spec) to paraphrase
        for sample in samples:
            made = ambiguous = 0
            for view in sample.views():
                graph = view.record.get("scene_graph")
                if not graph:
                    continue
                nodes, relations = graph["objects"], graph["relations"]
                entries = view.record["referring_expressions"] = []
                skip = rejected_ids(view.record) if self.params.verified_only else set()
                for node in nodes[: self.params.max_objects]:
                    if node["id"] in skip:
                        continue
                    spec = unique_expression(node, nodes, relations)
                    if spec is None:
                        ambiguous += 1
                        continue
                    entry = {"object_id": node["id"], "expression": spec.text(), "source": "template"}
                    entries.append(entry)
                    pending.append((entry, spec))
                    made += 1
            sample.stats["refexp.expressions"] = float(made)
            sample.stats["refexp.ambiguous"] = float(ambiguous)
        if self.params.paraphrase and pending:
            self.paraphrase(pending)

    def paraphrase(self, pending: list[tuple[dict[str, Any], ExpressionSpec]]) -> None:
        rendered = [self.prompt.render(expression=entry["expression"]) for entry, _ in pending]
        results = generate_checked(
            self.backend, [r.messages for r in rendered], self.sampling(), parse_phrase, self.params.attempts
        )
        for (entry, spec), r, result in zip(pending, rendered, results, strict=True):
            if result.ok and keeps_meaning(result.value, spec):
                entry.update(expression=result.value, source="llm", template=spec.text(), **r.provenance())
            else:
                entry["paraphrase_rejected"] = result.reason or "paraphrase lost a distinguishing word"
