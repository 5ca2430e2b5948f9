"""Verification (real spaCy + MiniLM), GCG export and referring expressions on hand-built records."""

from __future__ import annotations

import numpy as np
import pytest

from groundmill.schema import check_record, decode_mask, encode_mask
from groundmill.stages.base import Sample
from groundmill.stages.gcg import GCGExport, mark_phrases, parse_marked
from groundmill.stages.llm import FINISH_LENGTH, FINISH_STOP, Generation
from groundmill.stages.refexp import ExpressionSpec, ReferringExpressions, keeps_meaning, unique_expression
from groundmill.stages.scene_graph import build_scene_graph, render_scene_graph
from groundmill.stages.verification import Verification
from groundmill.tests.llm_doubles import ScriptedBackend

H, W = 60, 80


def obj(i, label, bbox, attributes=(), mask=True):
    o = {
        "id": i,
        "bbox": bbox,
        "labels": [label],
        "attributes": list(attributes),
        "score": 0.9,
        "detectors": [],
    }
    if mask:
        m = np.zeros((H, W), bool)
        x0, y0, x1, y1 = (int(v) for v in bbox)
        m[y0:y1, x0:x1] = True
        o["segmentation"] = encode_mask(m)
    return o


def image_sample(objects, caption=None):
    record = {"key": "k" * 24, "media": {"type": "image", "ext": "jpg", "width": W, "height": H},
              "objects": objects, "provenance": {}}  # fmt: skip
    record["scene_graph"] = build_scene_graph(record, W, H)
    if caption is not None:
        record["dense_caption"] = {"caption": caption, "details": []}
    return Sample(uri="x", key=record["key"], media_type="image", data=b"", frames=[], record=record)


SCENE = [
    obj(1, "dog", [5, 30, 25, 50], ["brown"]),
    obj(2, "bench", [30, 30, 70, 55], ["wooden"]),
    obj(3, "car", [50, 2, 78, 20], ["red"], mask=False),
]


@pytest.fixture(scope="module")
def verifier():
    stage = Verification(Verification.Params(max_hallucination_rate=0.3))
    stage.setup()
    return stage


def test_verification_grounds_phrases_with_exact_spans(verifier):
    s = image_sample(SCENE, "A brown dog sits near a wooden bench. A red car is parked in the background.")
    verifier.process([s])
    dense = s.record["dense_caption"]
    v = dense["verification"]
    assert v["noun_phrases"] == 3 and v["grounded"] == 3 and v["hallucination_rate"] == 0 and v["accepted"]
    assert [(d["phrase"], d["ids"]) for d in dense["details"]] == [("A brown dog", [1]), ("a wooden bench", [2]),
                                                                   ("A red car", [3])]  # fmt: skip
    assert check_record(s.record) == []
    assert s.stats["verification.hallucination_rate"] == 0.0 and s.stats["verification.rejected"] == 0.0


def test_verification_embedding_match_and_hallucinations(verifier):
    s = image_sample(SCENE, "A puppy is sleeping by a bench. A giraffe and an elephant are watching it.")
    verifier.process([s])
    v = s.record["dense_caption"]["verification"]
    assert v["hallucinated"] == ["A giraffe", "an elephant"]  # "A puppy" grounds to the dog by embedding
    assert v["noun_phrases"] == 4 and v["hallucination_rate"] == 0.5 and not v["accepted"]
    assert s.record["dense_caption"]["details"] == []  # a rejected caption is not grounded
    assert s.stats["verification.rejected"] == 1.0


def test_verification_prefers_objects_whose_attributes_the_phrase_names(verifier):
    objects = [obj(1, "car", [0, 0, 20, 20], ["red"]), obj(2, "car", [30, 0, 50, 20], ["blue"])]
    s = image_sample(objects, "A blue car is next to a car.")
    verifier.process([s])
    assert [d["ids"] for d in s.record["dense_caption"]["details"]] == [[2], [1, 2]]


def test_verification_regenerates_a_hallucinated_caption(verifier):
    s = image_sample(SCENE, "A giraffe eats a banana.")
    verifier.params.regenerate_attempts = 1
    captioner_prompt = None
    try:
        from groundmill.stages.dense_caption import DenseCaptioning

        captioner = DenseCaptioning(verifier.params)
        captioner_prompt = captioner.prompts_for_frames([(s, s.record)])[0][2].messages
        script = {str(captioner_prompt): [Generation("A brown dog sits on a bench.", FINISH_STOP)]}
        captioner.backend = _KeyedByText(script)
        verifier.captioner = captioner
        verifier.process([s])
    finally:
        verifier.params.regenerate_attempts = 0
    dense = s.record["dense_caption"]
    assert dense["caption"] == "A brown dog sits on a bench."
    assert dense["verification"]["accepted"] and dense["verification"]["regenerated"] == 1
    assert s.record["generations"]["dense_caption"]["prompt_id"] == "dense_caption@v1"


class _KeyedByText(ScriptedBackend):
    """Test double keyed by the prompt's text form (chat prompts are lists)."""

    def generate(self, prompts, params):
        return super().generate([str(p) for p in prompts], params)


def test_dense_caption_drop_is_recorded_with_reason():
    from groundmill.stages.dense_caption import DenseCaptioning

    s = image_sample(SCENE)
    stage = DenseCaptioning(DenseCaptioning.Params(attempts=2))
    prompt = stage.prompts_for_frames([(s, s.record)])[0][2].messages
    stage.backend = _KeyedByText({str(prompt): [Generation("A dog", FINISH_LENGTH)] * 2})
    stage.process([s])
    assert "dense_caption" not in s.record
    drop = s.record["llm_drops"][0]
    assert drop["stage"] == "dense_caption" and drop["attempts"] == 2 and "did not stop" in drop["reason"]
    assert drop["prompt_id"] == "dense_caption@v1" and len(drop["prompt_hash"]) == 16
    assert s.stats["dense_caption.dropped"] == 1.0


def test_gcg_export_maps_every_phrase_to_masks():
    s = image_sample(SCENE, "A brown dog sits near a wooden bench. A red car is parked.")
    s.record["dense_caption"]["details"] = [
        {"phrase": "A brown dog", "tokens_positive": [0, 11], "ids": [1], "bbox": []},
        {"phrase": "a wooden bench", "tokens_positive": [22, 36], "ids": [2], "bbox": []},
        {"phrase": "A red car", "tokens_positive": [38, 47], "ids": [3], "bbox": []},  # no mask: left out
    ]
    s.record["dense_caption"]["verification"] = {"accepted": True}
    GCGExport().process([s])
    gcg = s.record["gcg"]
    assert gcg["file_name"] == f"{s.key}.jpg"
    assert [(g["phrase"], g["object_ids"]) for g in gcg["groundings"]] == [
        ("A brown dog", [1]),
        ("a wooden bench", [2]),
    ]
    for g in gcg["groundings"]:
        start, end = g["tokens_positive"]
        assert gcg["caption"][start:end] == g["phrase"]
        assert g["rle_masks"] and all(decode_mask(m).shape == (H, W) for m in g["rle_masks"])
    rejected = image_sample(SCENE, "A dog.")
    rejected.record["dense_caption"]["verification"] = {"accepted": False}
    GCGExport().process([rejected])
    assert "gcg" not in rejected.record


def test_referring_expressions_single_out_their_object():
    objects = [
        obj(1, "dog", [0, 30, 10, 40], ["brown"]),
        obj(2, "dog", [20, 30, 30, 40], ["black"]),
        obj(3, "dog", [40, 30, 50, 40], ["black"]),
        obj(4, "bench", [60, 30, 79, 59]),
    ]
    s = image_sample(objects)
    ReferringExpressions().process([s])
    got = {e["object_id"]: e["expression"] for e in s.record["referring_expressions"]}
    assert got[1] == "the brown dog" and got[4] == "the bench"
    assert got[2] == "the leftmost black dog" or got[2].startswith("the black dog ")
    assert got[2] != got[3]
    nodes = s.record["scene_graph"]["objects"]
    twins = [dict(n, id=k, attributes=[]) for k, n in enumerate([nodes[0], nodes[0]])]
    assert unique_expression(twins[0], twins, []) is None  # identical objects cannot be told apart
    assert all(e["source"] == "template" for e in s.record["referring_expressions"])


def test_paraphrase_must_keep_distinguishing_words():
    spec = ExpressionSpec("dog", ("black",), ("left of", "bench"))
    assert keeps_meaning("the black dog to the left of the bench", spec)
    assert not keeps_meaning("the dog near the bench", spec)


def test_checklist_pass_counts_claims_without_objects(verifier):
    caption = "A brown dog sits near a wooden bench."
    s = image_sample(SCENE, caption)
    rendered = verifier.prompt.render(caption=caption).messages
    answers = [Generation("not a list", FINISH_STOP), Generation('["dog", "bench", "frisbee"]', FINISH_STOP)]
    verifier.params.checklist, verifier.backend = True, _KeyedByText({str(rendered): answers})
    try:
        verifier.process([s])
    finally:
        verifier.params.checklist, verifier.backend = False, None
    checklist = s.record["dense_caption"]["verification"]["checklist"]
    assert checklist["claims"] == ["dog", "bench", "frisbee"] and checklist["unmatched"] == ["frisbee"]
    assert checklist["prompt_id"] == "verification_checklist@v1"
    assert s.stats["verification.checklist_unmatched_rate"] == pytest.approx(1 / 3, abs=1e-3)


def _gcg_sample():
    s = image_sample(SCENE, "There is a brown dog and it sits near a wooden bench.")
    s.record["dense_caption"]["details"] = [
        {"phrase": "a brown dog", "tokens_positive": [9, 20], "ids": [1], "bbox": []},
        {"phrase": "a wooden bench", "tokens_positive": [38, 52], "ids": [2], "bbox": []},
    ]
    s.record["dense_caption"]["verification"] = {"accepted": True}
    return s


def test_mark_and_parse_marked_phrases():
    s = _gcg_sample()
    GCGExport().process([s])
    marked = mark_phrases(s.record["gcg"])
    assert marked == "There is <p>a brown dog</p> and it sits near <p>a wooden bench</p>."
    phrases = {"a brown dog", "a wooden bench"}
    caption, spans = parse_marked("<p>a brown dog</p> sits by <p>a wooden bench</p>.", phrases)
    assert caption == "a brown dog sits by a wooden bench." and spans == {
        "a brown dog": [0, 11],
        "a wooden bench": [20, 34],
    }
    for bad, reason in [
        ("<p>a brown dog</p> sits.", "lost"),
        ("<p>a dog</p> sits by <p>a wooden bench</p>.", "not one of"),
        ("<p>a brown dog</p> by <p>a wooden bench</p> <p>x", "unbalanced"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_marked(bad, phrases)


def test_gcg_rewrite_keeps_spans_exact_or_keeps_the_original():
    good, bad = _gcg_sample(), _gcg_sample()
    bad.key = bad.record["key"] = "b" * 24
    bad.record["dense_caption"]["caption"] = "Here is a brown dog and it sits near a wooden bench."
    bad.record["dense_caption"]["details"][0]["tokens_positive"] = [8, 19]
    bad.record["dense_caption"]["details"][1]["tokens_positive"] = [37, 51]
    stage = GCGExport(GCGExport.Params(rewrite=True, attempts=2))
    prompts = {}
    for s in (good, bad):
        probe = GCGExport()
        probe.process([s])
        prompts[s.key] = str(stage.prompt.render(caption=mark_phrases(s.record["gcg"])).messages)
        del s.record["gcg"]
    rewrite = Generation("<p>a brown dog</p> sits near <p>a wooden bench</p>.", FINISH_STOP)
    lost = Generation("A dog sits.", FINISH_STOP)
    stage.backend = _KeyedByText({prompts[good.key]: [rewrite], prompts[bad.key]: [lost, lost]})
    stage.process([good, bad])
    gcg = good.record["gcg"]
    assert gcg["caption"] == "a brown dog sits near a wooden bench."
    for g in gcg["groundings"]:
        assert gcg["caption"][slice(*g["tokens_positive"])] == g["phrase"] and g["rle_masks"]
    assert good.record["generations"]["gcg"]["prompt_id"] == "gcg_rewrite@v1"
    kept = bad.record["gcg"]
    assert kept["caption"] == bad.record["dense_caption"]["caption"]
    assert "lost grounded phrase" in bad.record["llm_drops"][0]["reason"]


def stuff_region(i, label, rows):
    m = np.zeros((H, W), bool)
    m[rows] = True
    return {"id": i, "label": label, "segmentation": encode_mask(m), "score": 0.8, "area": int(m.sum())}


def test_stuff_is_background_context_and_grounds_gcg_phrases(verifier):
    """Grass below the dog and sky above it: the scene graph says `dog on the grass` / `dog under the
    sky`, verification grounds "the grass" to its region, and GCG exports the region's mask."""
    s = image_sample([obj(1, "dog", [20, 20, 40, 40], ["brown"])])
    s.record["stuff"] = [stuff_region(5, "grass", slice(40, H)), stuff_region(6, "sky", slice(0, 15))]
    graph = s.record["scene_graph"] = build_scene_graph(s.record, W, H)
    assert [(n["id"], n["label"]) for n in graph["stuff"]] == [(5, "grass"), (6, "sky")]
    assert graph["background"] == [
        {"subject": 1, "predicate": "on", "object": 5},
        {"subject": 1, "predicate": "under", "object": 6},
    ]
    assert graph["relations"] == []  # object-object relations only
    text = render_scene_graph(graph)
    assert "Background: grass; sky" in text and "Context: dog on the grass; dog under the sky" in text
    s.record["dense_caption"] = {"caption": "A brown dog stands on the grass.", "details": []}
    verifier.process([s])
    assert [(d["phrase"], d["ids"]) for d in s.record["dense_caption"]["details"]] == [
        ("A brown dog", [1]),
        ("the grass", [5]),
    ]
    GCGExport().process([s])
    grass = next(g for g in s.record["gcg"]["groundings"] if g["object_ids"] == [5])
    assert decode_mask(grass["rle_masks"][0])[40:].all() and not decode_mask(grass["rle_masks"][0])[:40].any()
    assert check_record(s.record) == []
