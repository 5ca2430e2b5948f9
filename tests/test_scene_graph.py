"""Scene-graph logic on hand-built objects with known answers."""

from __future__ import annotations

import numpy as np

from groundmill.stages.scene_graph import (
    RelationParams,
    build_scene_graph,
    context_shares,
    depth_layer,
    pair_relations,
    proximity_groups,
    rank_objects,
    render_scene_graph,
)

DIAG = 1000.0


def node(i, label, bbox, depth=None, attributes=(), score=0.5, floating=False):
    return {"id": i, "label": label, "bbox": bbox, "depth": depth, "attributes": list(attributes),
            "score": score, "floating": floating, "phrases": []}  # fmt: skip


def test_depth_layers_follow_grand_cutoffs():
    assert [depth_layer(d) for d in (0.05, 0.1, 0.59, 0.6, 0.84, 0.85, 1.0)] == [
        "immediate foreground", "foreground", "foreground", "midground", "midground", "background", "background",
    ]  # fmt: skip
    assert depth_layer(None) == "unknown depth"


def test_pair_relations():
    p = RelationParams()
    table, cup = node(1, "table", [100, 300, 500, 600]), node(2, "cup", [200, 250, 260, 320])
    assert pair_relations(cup, table, DIAG, p) == ["on"]
    bowl, apple = node(3, "bowl", [0, 0, 200, 200]), node(4, "apple", [50, 80, 120, 150])
    assert pair_relations(apple, bowl, DIAG, p) == ["inside"]
    assert pair_relations(bowl, apple, DIAG, p) == ["near"]  # not inside its content; touching is near
    dog, cat = node(5, "dog", [0, 0, 100, 100]), node(6, "cat", [300, 20, 400, 90])
    assert pair_relations(dog, cat, DIAG, p) == ["left of"]
    assert pair_relations(cat, dog, DIAG, p) == []
    kite, person = node(7, "kite", [100, 0, 200, 50]), node(8, "person", [120, 200, 180, 400])
    assert pair_relations(kite, person, DIAG, p) == ["above"]
    near_a, near_b = node(9, "a", [0, 0, 100, 100], depth=0.1), node(10, "b", [0, 120, 100, 220], depth=0.1)
    assert pair_relations(near_a, near_b, DIAG, p) == ["above"]
    person2, car = (
        node(11, "person", [100, 100, 200, 300], depth=0.2),
        node(12, "car", [50, 150, 400, 350], depth=0.6),
    )
    assert "in front of" in pair_relations(person2, car, DIAG, p)
    assert "in front of" not in pair_relations(car, person2, DIAG, p)
    far_a, far_b = node(13, "a", [0, 0, 10, 10]), node(14, "b", [30, 500, 40, 510])
    assert pair_relations(far_a, far_b, DIAG, p) == []


def test_rank_puts_attributes_first_then_confirmed_then_score_and_caps():
    objs = [
        node(1, "a", [0, 0, 10, 10], score=0.9),
        node(2, "b", [0, 0, 10, 10], score=0.1, attributes=["red"]),
        node(3, "c", [0, 0, 10, 10], score=0.95, floating=True),
        node(4, "d", [0, 0, 50, 50], score=0.9),
    ]
    assert [o["id"] for o in rank_objects(objs, 10)] == [2, 4, 1, 3]
    assert [o["id"] for o in rank_objects(objs, 2)] == [2, 4]


def test_proximity_groups_are_connected_components():
    objs = [node(1, "a", [0, 0, 10, 10]), node(2, "b", [12, 0, 20, 10]), node(3, "c", [22, 0, 30, 10]),
            node(4, "d", [500, 500, 510, 510]), node(5, "e", [900, 900, 950, 950])]  # fmt: skip
    assert proximity_groups(objs, DIAG, 0.01) == [[1, 2, 3]]


def test_build_and_render_from_a_record():
    frame = {
        "landmark": {"category": "indoor", "fine": "kitchen", "score": 0.8},
        "captions": [{"text": "a cup on a table", "model": "x"}],
        "objects": [
            {"id": 1, "bbox": [100, 300, 500, 600], "labels": ["table"], "attributes": ["wooden"], "score": 0.9,
             "detectors": [], "depth": 0.5},
            {"id": 2, "bbox": [200, 250, 260, 320], "labels": ["cup"], "attributes": ["white"], "score": 0.8,
             "detectors": [], "depth": 0.45},
        ],
        "floating_objects": [
            {"id": 3, "bbox": [0, 0, 50, 50], "labels": ["window"], "attributes": [], "score": 0.3, "detectors": [],
             "depth": 0.9},
        ],
        "relationships": {"grounding": [{"phrase": "a cup", "caption_index": 0, "tokens_positive": [0, 5],
                                          "object_ids": [2]}]},
    }  # fmt: skip
    graph = build_scene_graph(frame, 640, 640, max_objects=100)
    assert [o["id"] for o in graph["objects"]] == [1, 2, 3]
    assert graph["layers"] == {"foreground": [1, 2], "background": [3]}
    assert {"subject": 2, "predicate": "on", "object": 1} in graph["relations"]
    assert graph["objects"][2]["floating"] is True
    text = render_scene_graph(graph)
    assert text.splitlines()[:3] == ["Scene: indoor, kitchen", "Caption: a cup on a table",
                                     "Foreground: table (wooden); cup (white, a cup)"]  # fmt: skip
    assert "cup on table" in text
    assert build_scene_graph(frame, 640, 640, max_objects=1)["dropped_objects"] == 2


def test_stuff_context_shares_below_inside_and_above_a_box():
    mask = np.zeros((20, 10), bool)
    mask[15:] = True  # the bottom quarter
    assert context_shares([2, 5, 8, 15], mask) == {"on": 1.0, "in front of": 0.0, "under": 0.0}
    # a box flush with the image's bottom edge tests its own bottom tenth
    assert context_shares([0, 10, 10, 20], mask)["on"] == 1.0
    assert context_shares([0, 16, 10, 18], ~mask)["under"] == 15 / 16
