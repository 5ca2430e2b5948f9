"""GranD level 3's hierarchical scene graph, built from the level 1-2 record by pure geometry.

Objects are ranked (those with attributes first, confirmed before floating, then by score and
size) and capped; placed in depth layers by normalised depth (GranD's cut-offs 0.1 / 0.6 / 0.85);
grouped by proximity; and related pairwise by boxes and depth: `on`, `inside`, `in front of`,
`above`, `left of`, `near`. Stuff regions (the stuff stage's sky, grass, road...) are background
context: each object is `on` the region under its box's bottom edge, `in front of` the one filling
its box, and `under` the one above it (`background` relations, object id -> stuff id). The graph is stored in the record and rendered as the compact text the
dense-caption and extra-context prompts read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from groundmill.schema import FrameRecord, Object, Relation, SceneStuff, StuffRegion, decode_mask, mask_bbox
from groundmill.stages.base import Sample, Stage

Box = list[float]

# GranD's depth cut-offs on normalised depth (0 near .. 1 far) and the layer names, nearest first.
DEPTH_CUTS = (0.1, 0.6, 0.85)
LAYERS = ("immediate foreground", "foreground", "midground", "background")
UNKNOWN_LAYER = "unknown depth"


def depth_layer(depth: float | None) -> str:
    if depth is None:
        return UNKNOWN_LAYER
    for cut, layer in zip(DEPTH_CUTS, LAYERS, strict=False):
        if depth < cut:
            return layer
    return LAYERS[-1]


def area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def intersection(a: Box, b: Box) -> float:
    return area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def overlap_1d(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def gap(a: Box, b: Box) -> float:
    """Shortest distance between two boxes (0 when they touch or overlap)."""
    dx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return math.hypot(dx, dy)


@dataclass
class RelationParams:
    near_frac: float = 0.05  # `near` / same group: box gap <= this fraction of the image diagonal
    depth_gap: float = 0.15  # `in front of`: normalised depth difference between overlapping objects
    contain_frac: float = 0.9  # `inside` / `on`: share of the subject's box inside the other's
    edge_tol: float = 0.1  # slack, as a fraction of the subject's size, for edge tests


def pair_relations(a: dict[str, Any], b: dict[str, Any], diag: float, p: RelationParams) -> list[str]:
    """Predicates that hold for `a <predicate> b` (subject a, object b), most specific first."""
    ba, bb = a["bbox"], b["bbox"]
    wa, ha = ba[2] - ba[0], ba[3] - ba[1]
    hb = bb[3] - bb[1]
    out: list[str] = []
    contained = area(ba) > 0 and intersection(ba, bb) / area(ba) >= p.contain_frac
    # `on`: a rests on b's upper part and sticks out above it (a cup on a table).
    rests_on = (
        overlap_1d(ba[0], ba[2], bb[0], bb[2]) >= 0.5 * wa
        and bb[1] - p.edge_tol * ha <= ba[3] <= bb[1] + 0.4 * hb
        and ba[1] < bb[1]
        and area(ba) < area(bb)
    )
    if rests_on:
        out.append("on")
    elif contained and area(ba) <= 0.5 * area(bb):
        out.append("inside")
    da, db = a.get("depth"), b.get("depth")
    if da is not None and db is not None and db - da >= p.depth_gap and intersection(ba, bb) > 0:
        out.append("in front of")
    if not out:
        if ba[3] <= bb[1] + p.edge_tol * ha and overlap_1d(ba[0], ba[2], bb[0], bb[2]) > 0:
            out.append("above")
        elif ba[2] <= bb[0] + p.edge_tol * wa and overlap_1d(ba[1], ba[3], bb[1], bb[3]) > 0:
            out.append("left of")
    if not out and gap(ba, bb) <= p.near_frac * diag:
        out.append("near")
    return out


def rank_objects(objects: list[dict[str, Any]], max_objects: int) -> list[dict[str, Any]]:
    """GranD's order and cap: objects with attributes first, confirmed before floating, then score, size."""
    key = lambda o: (not o["attributes"], o["floating"], -o["score"], -area(o["bbox"]), o["id"])  # noqa: E731
    return sorted(objects, key=key)[:max_objects]


def proximity_groups(objects: list[dict[str, Any]], diag: float, near_frac: float) -> list[list[int]]:
    """Connected components of the `box gap <= near_frac * diagonal` graph, groups of 2+ only."""
    parent = list(range(len(objects)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            if gap(objects[i]["bbox"], objects[j]["bbox"]) <= near_frac * diag:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault(root(i), []).append(o["id"])
    return [g for g in groups.values() if len(g) > 1]


def _node(obj: Object, floating: bool, phrases: list[str]) -> dict[str, Any]:
    depth = obj.get("depth")
    return {
        "id": obj["id"],
        "label": obj["labels"][0] if obj["labels"] else "object",
        "attributes": list(obj.get("attributes", [])),
        "phrases": phrases,
        "bbox": [float(v) for v in obj["bbox"]],
        "score": float(obj.get("score", 0.0)),
        "depth": depth,
        "layer": obj.get("depth_layer") or depth_layer(depth),
        "floating": floating,
    }


def stuff_node(region: StuffRegion, image_area: int) -> SceneStuff:
    return SceneStuff(
        id=region["id"],
        label=region["label"],
        attributes=[],
        bbox=[float(v) for v in mask_bbox(region["segmentation"])],
        area_frac=round(region["area"] / image_area, 4) if image_area else 0.0,
    )


def _share(mask: np.ndarray, rows: slice, cols: slice) -> float:
    window = mask[rows, cols]
    return float(window.mean()) if window.size else 0.0


def context_shares(box: Box, mask: np.ndarray) -> dict[str, float]:
    """How much of a stuff mask lies just below a box (a band a tenth of its height, or its own
    bottom tenth at the image's edge), inside it, and above it (within its columns)."""
    height = mask.shape[0]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    cols = slice(max(0, x0), max(x0 + 1, x1))
    band = max(1, round(0.1 * (y1 - y0)))
    below = slice(y1, y1 + band) if y1 < height else slice(max(0, y1 - band), y1)
    return {
        "on": _share(mask, below, cols),
        "in front of": _share(mask, slice(max(0, y0), y1), cols),
        "under": _share(mask, slice(0, max(0, y0)), cols),
    }


def background_relations(
    objects: list[dict[str, Any]], regions: list[StuffRegion], min_share: float = 0.4
) -> list[Relation]:
    """Each object's best `on` (else `in front of`) region and best `under` region, when that region covers at
    least `min_share` of the place tested (context_shares)."""
    masks = {r["id"]: decode_mask(r["segmentation"]) for r in regions}
    out = []
    for obj in objects:
        shares = {rid: context_shares(obj["bbox"], m) for rid, m in masks.items()}
        for group in (("on", "in front of"), ("under",)):
            best = max(((s[p], p, rid) for rid, s in shares.items() for p in group), default=None)
            if best and best[0] >= min_share:
                out.append(Relation(subject=obj["id"], predicate=best[1], object=best[2]))
    return out


def build_scene_graph(
    frame: FrameRecord,
    width: int,
    height: int,
    max_objects: int = 100,
    max_relations_per_object: int = 3,
    relation_params: RelationParams | None = None,
) -> dict[str, Any]:
    """The scene graph of one image (or keyframe) record."""
    p = relation_params or RelationParams()
    captions = [c["text"] for c in frame.get("captions", [])]
    phrases: dict[int, list[str]] = {}
    for g in frame.get("relationships", {}).get("grounding", []):
        for oid in g["object_ids"]:
            phrases.setdefault(oid, []).append(g["phrase"])
    nodes = [_node(o, False, phrases.get(o["id"], [])) for o in frame.get("objects", [])]
    nodes += [_node(o, True, phrases.get(o["id"], [])) for o in frame.get("floating_objects", [])]
    kept = rank_objects(nodes, max_objects)
    diag = math.hypot(width, height)

    relations = []
    for a in kept:
        # Each object relates to its few nearest neighbours only: the graph stays small and local.
        neighbours = sorted(
            (o for o in kept if o is not a), key=lambda o: (gap(a["bbox"], o["bbox"]), o["id"])
        )
        for b in neighbours[:max_relations_per_object]:
            for predicate in pair_relations(a, b, diag, p):
                relations.append({"subject": a["id"], "predicate": predicate, "object": b["id"]})
    # `near` is symmetric: keep one direction.
    seen: set[tuple[int, int]] = set()
    unique = []
    for r in relations:
        if r["predicate"] == "near":
            pair = (min(r["subject"], r["object"]), max(r["subject"], r["object"]))
            if pair in seen:
                continue
            seen.add(pair)
        unique.append(r)

    layers: dict[str, list[int]] = {}
    for o in kept:
        layers.setdefault(o["layer"], []).append(o["id"])
    landmark = frame.get("landmark")
    graph = {
        "scene": {"category": landmark["category"], "fine": landmark["fine"]} if landmark else None,
        "captions": captions,
        "objects": kept,
        "layers": {name: layers[name] for name in (*LAYERS, UNKNOWN_LAYER) if name in layers},
        "groups": proximity_groups(kept, diag, p.near_frac),
        "relations": unique,
        "dropped_objects": len(nodes) - len(kept),
    }
    if "stuff" in frame:
        graph["stuff"] = [stuff_node(r, width * height) for r in frame["stuff"]]
        graph["background"] = background_relations(kept, frame["stuff"])
    return graph


def describe_object(node: dict[str, Any]) -> str:
    details = node["attributes"] + [ph for ph in node["phrases"] if ph != node["label"]]
    return f"{node['label']} ({', '.join(details)})" if details else node["label"]


def scene_text(graph: dict[str, Any]) -> str:
    scene = graph["scene"]
    return f"{scene['category']}, {scene['fine']}" if scene else "unknown"


def render_scene_graph(graph: dict[str, Any], max_captions: int = 2) -> str:
    """The compact text form the prompts read (the format of their in-context examples)."""
    by_id = {o["id"]: o for o in graph["objects"]}
    lines = [f"Scene: {scene_text(graph)}"]
    lines += [f"Caption: {c}" for c in graph["captions"][:max_captions]]
    for layer, ids in graph["layers"].items():
        lines.append(f"{layer.capitalize()}: " + "; ".join(describe_object(by_id[i]) for i in ids))
    if graph["relations"]:
        rels = [
            f"{by_id[r['subject']]['label']} {r['predicate']} {by_id[r['object']]['label']}"
            for r in graph["relations"]
        ]
        lines.append("Relations: " + "; ".join(rels))
    stuff = {s["id"]: s["label"] for s in graph.get("stuff", [])}
    if stuff:
        lines.append("Background: " + "; ".join(stuff.values()))
    context = [f"{by_id[r['subject']]['label']} {r['predicate']} the {stuff[r['object']]}"
               for r in graph.get("background", [])]  # fmt: skip
    if context:
        lines.append("Context: " + "; ".join(context))
    return "\n".join(lines)


class SceneGraph(Stage):
    name = "scene_graph"
    provides = ("scene_graph",)
    requires = ("objects",)
    uses = ("stuff",)
    uses_model = False
    uses_pixels = False

    @dataclass
    class Params:
        max_objects: int = 100
        max_relations_per_object: int = 3
        near_frac: float = 0.05
        depth_gap: float = 0.15

    def process(self, samples: list[Sample]) -> None:
        rp = RelationParams(near_frac=self.params.near_frac, depth_gap=self.params.depth_gap)
        for sample in samples:
            media = sample.record["media"]
            for view in sample.views():
                view.record["scene_graph"] = build_scene_graph(
                    view.record,
                    media["width"],
                    media["height"],
                    self.params.max_objects,
                    self.params.max_relations_per_object,
                    rp,
                )
