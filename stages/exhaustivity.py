"""The exhaustivity verifier and hard negatives (SAM 3's SA-Co engine, arXiv 2511.16719: is every
instance of a phrase masked? which phrases are verified absent?).

Per (image, concept), where the concepts are the objects' labels and the tagger's candidates:

- a second detector pass at a low threshold, queried with the concepts (and their confusable
  neighbours) only, gives hits per phrase, each place keeping its best-scoring phrase; a hit whose box overlaps no object of its phrase
  (IoU < `min_iou`) is an instance nobody masked;
- floating objects whose mask came from SAM2's automatic mask generator (`segmentation_source:
  "SAM2-auto"`, labelled by CLIP) are hits too, matched by mask IoU;
- `concepts: [{phrase, present, exhaustive, object_ids, unmatched}]`: `object_ids` are the phrase's
  objects (verified ones only, when `verified_only`), `exhaustive` means no unmatched hit.

Objects the concept pass does not find (no hit of their label over their box) fail the check
`concept_confirmed` of their `verification` (`confirm_objects`): that is how a swapped label shows.

Hard negatives (`negatives`): tagger candidates no detector confirmed (no first-pass detection and no
hit), then confusable neighbours of present concepts (text-embedding cosine similarity over the
tag vocabulary within [`min_similarity`, `max_similarity`]: close enough to confuse, not a synonym)
that the low-threshold pass does not find either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from groundmill.schema import Concept, FrameRecord, MaskVerification, Object, decode_mask, mask_bbox
from groundmill.stages.base import ModelSpec, Sample, Stage, views_of
from groundmill.stages.boxes import Detection, box_iou, filter_detections

AUTO_SOURCE = "SAM2-auto"


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 0.0


def label_of(obj: Object) -> str:
    return obj["labels"][0].lower() if obj["labels"] else ""


def is_auto(obj: Object) -> bool:
    return obj.get("segmentation_source") == AUTO_SOURCE


def trusted(obj: Object, verified_only: bool) -> bool:
    return not verified_only or obj.get("verification", {}).get("accepted", True)


def frame_concepts(frame: FrameRecord, max_concepts: int) -> tuple[list[str], list[str]]:
    """(present concepts: the detected objects' labels, candidates: tags no object carries)."""
    labels = [
        label_of(o) for g in ("objects", "floating_objects") for o in frame.get(g, []) if not is_auto(o)
    ]
    present = list(dict.fromkeys(lab for lab in labels if lab))[:max_concepts]
    tags = [t["label"].lower() for t in frame.get("tags", [])]
    return present, [t for t in dict.fromkeys(tags) if t not in present][:max_concepts]


def object_box(obj: Object) -> list[float]:
    return mask_bbox(obj["segmentation"]) if "segmentation" in obj else list(obj["bbox"])


def unmatched_hits(
    boxes: list[list[float]], auto_masks: list[np.ndarray], objects: list[Object], min_iou: float
) -> int:
    """Hits (detector boxes, automatic masks) that overlap none of `objects` at `min_iou`; an object
    with a mask is where its mask is (its tight box), so a mask shifted off its instance leaves it."""
    obj_boxes = np.array([object_box(o) for o in objects]).reshape(-1, 4)
    n = 0
    if boxes:
        ious = box_iou(np.array(boxes), obj_boxes)
        n += int((ious.max(axis=1, initial=0.0) < min_iou).sum())
    masks = [decode_mask(o["segmentation"]) for o in objects if "segmentation" in o]
    n += sum(max((mask_iou(a, m) for m in masks), default=0.0) < min_iou for a in auto_masks)
    return n


def best_phrase_hits(hits: dict[str, list[Detection]], min_iou: float) -> dict[str, list[Detection]]:
    """Hits that no hit of another phrase overlaps (IoU >= `min_iou`) with a higher score: at one place
    the pass names one phrase (a weak "red circle" on a red square is the square's)."""
    flat = [(phrase, d) for phrase, dets in hits.items() for d in dets]
    if not flat:
        return {}
    ious = box_iou(np.array([d["bbox"] for _, d in flat]), np.array([d["bbox"] for _, d in flat]))
    out: dict[str, list[Detection]] = {}
    for i, (phrase, d) in enumerate(flat):
        rivals = [
            j
            for j, (q, e) in enumerate(flat)
            if q != phrase and ious[i, j] >= min_iou and e["score"] > d["score"]
        ]
        if not rivals:
            out.setdefault(phrase, []).append(d)
    return out


def confirm(obj: Object, hit_boxes: list[list[float]], min_iou: float) -> None:
    """Record whether the concept pass found the object; an unconfirmed object is rejected."""
    found = bool(hit_boxes) and float(box_iou(np.array([obj["bbox"]]), np.array(hit_boxes)).max()) >= min_iou
    v = obj.setdefault("verification", MaskVerification(score=1.0, accepted=True, reasons=[]))
    v.setdefault("features", {})["concept_confirmed"] = float(found)
    if not found:
        v["accepted"] = False
        v["reasons"].append("concept not confirmed")


def concept_report(
    frame: FrameRecord, hits: dict[str, list[Detection]], present: list[str], candidates: list[str],
    min_iou: float, verified_only: bool,
) -> list[Concept]:  # fmt: skip
    """The `concepts` of one frame from the concept-restricted hits (phrase -> detections)."""
    objects = [o for g in ("objects", "floating_objects") for o in frame.get(g, [])]
    auto = [o for o in objects if is_auto(o) and "segmentation" in o]
    out = []
    for phrase in present + candidates:
        members = [
            o for o in objects if not is_auto(o) and label_of(o) == phrase and trusted(o, verified_only)
        ]
        boxes = [list(h["bbox"]) for h in hits.get(phrase, [])]
        autos = [decode_mask(o["segmentation"]) for o in auto if label_of(o) == phrase]
        missed = unmatched_hits(boxes, autos, members, min_iou)
        out.append(
            Concept(phrase=phrase, present=bool(members) or bool(missed), exhaustive=missed == 0,
                    object_ids=sorted(o["id"] for o in members), unmatched=missed)
        )  # fmt: skip
    return out


def neighbours(
    concepts: list[str], vocabulary: list[str], vocab_emb: np.ndarray, concept_emb: np.ndarray,
    k: int, min_similarity: float, max_similarity: float,
) -> list[str]:  # fmt: skip
    """Up to k vocabulary words per concept, most similar first, within the similarity band, never a
    concept itself."""
    taken = set(concepts)
    out: dict[str, None] = {}
    sims = concept_emb @ vocab_emb.T
    for row in sims:
        order = np.argsort(-row)
        picked = [vocabulary[j] for j in order if min_similarity <= row[j] <= max_similarity]
        for word in [w for w in picked if w not in taken][:k]:
            out.setdefault(word, None)
    return list(out)


def hard_negatives(
    frame: FrameRecord,
    candidates: list[str],
    confusable: list[str],
    hits: dict[str, list[Detection]],
    limit: int,
) -> list[str]:
    """Tag candidates no detector confirmed, then confusable neighbours the concept pass did not find."""
    detected = {d["label"].lower() for dets in frame.get("detections", {}).values() for d in dets}
    unconfirmed = [c for c in candidates if c not in detected and not hits.get(c)]
    absent = [c for c in confusable if not hits.get(c) and c not in detected]
    return list(dict.fromkeys(unconfirmed + absent))[:limit]


class Exhaustivity(Stage):
    name = "exhaustivity"
    provides = ("concepts", "negatives", "objects.verification")
    requires = ("objects",)
    uses = ("tags", "objects.verification", "detections")

    @dataclass
    class Params:
        detector: str = "owlv2"  # the second pass's model class (stages.detection.DETECTORS)
        query_template: str = "a photo of a {}"
        score_threshold: float = 0.05  # low: the pass looks for instances the first one missed
        nms_iou: float = 0.5
        max_boxes: int = 50
        min_iou: float = 0.5  # a hit is an object's instance at this box (or mask) IoU
        max_concepts: int = 16
        verified_only: bool = True  # a concept's objects: those the mask verifier accepted
        confirm_objects: bool = True  # reject objects the concept pass does not find
        embedder: str = "sentence-transformers/all-MiniLM-L6-v2"  # "tiny": random weights
        vocabularies: list[str] = field(default_factory=lambda: ["coco", "extra"])
        neighbours_per_concept: int = 3
        min_similarity: float = 0.4
        max_similarity: float = 0.9
        max_negatives: int = 30

    def setup(self) -> None:
        from groundmill.stages.detection import DETECTORS
        from groundmill.stages.models import device_for, dtype_for
        from groundmill.stages.tagging import load_vocabulary
        from groundmill.stages.text_embed import load_text_embedder

        device = device_for(self.model_spec, self.resources)
        dtype = dtype_for(self.model_spec, device)
        self.detector = DETECTORS[self.params.detector](self.model_spec, device, dtype, self.seed)
        self.embedder = load_text_embedder(ModelSpec(id=self.params.embedder), self.resources, self.seed)
        self.vocabulary = load_vocabulary(self.params.vocabularies)
        self.vocab_emb = self.embedder.encode(self.vocabulary)

    def concept_hits(self, image: Any, queries: list[str]) -> dict[str, list[Detection]]:
        """The low-threshold pass restricted to `queries`: phrase -> its detections."""
        p = self.params
        dets = self.detector.detect(image, queries, p.query_template) if queries else []
        wanted = set(queries)
        kept = [
            d
            for d in filter_detections(dets, p.score_threshold, p.nms_iou, p.max_boxes)
            if d["label"] in wanted
        ]
        out: dict[str, list[Detection]] = {}
        for d in kept:
            out.setdefault(d["label"], []).append(d)
        return best_phrase_hits(out, p.min_iou)

    def process(self, samples: list[Sample]) -> None:
        p = self.params
        for view in views_of(samples):
            frame = view.record
            present, candidates = frame_concepts(frame, p.max_concepts)
            confusable = []
            if present:
                emb = self.embedder.encode(present)
                confusable = neighbours(present, self.vocabulary, self.vocab_emb, emb,
                                        p.neighbours_per_concept, p.min_similarity, p.max_similarity)  # fmt: skip
                confusable = [c for c in confusable if c not in candidates]
            hits = self.concept_hits(view.image, list(dict.fromkeys(present + candidates + confusable)))
            if p.confirm_objects:
                for obj in (o for g in ("objects", "floating_objects") for o in frame.get(g, [])):
                    if not is_auto(obj) and label_of(obj):
                        confirm(obj, [list(h["bbox"]) for h in hits.get(label_of(obj), [])], p.min_iou)
            frame["concepts"] = concept_report(frame, hits, present, candidates, p.min_iou, p.verified_only)
            frame["negatives"] = hard_negatives(frame, candidates, confusable, hits, p.max_negatives)
            stats = view.sample.stats  # a video's keyframes add up
            missed = sum(not c["exhaustive"] for c in frame["concepts"])
            stats["exhaustivity.not_exhaustive"] = stats.get("exhaustivity.not_exhaustive", 0.0) + missed
            stats["exhaustivity.negatives"] = stats.get("exhaustivity.negatives", 0.0) + len(
                frame["negatives"]
            )

    def provenance(self) -> dict[str, Any]:
        from groundmill.stages.hub import random_weights

        p = self.params
        info = super().provenance()
        info["random_weights"] = info["random_weights"] or random_weights(ModelSpec(id=p.embedder))
        return info | {
            "detector": p.detector, "score_threshold": p.score_threshold, "min_iou": p.min_iou,
            "embedder": p.embedder, "vocabularies": list(p.vocabularies),
        }  # fmt: skip
