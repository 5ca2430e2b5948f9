"""The bench needs the words: the compositional split is held out, and reading the colour and shape
words fails on the relational targets."""

import json

import numpy as np

from groundmill.model.bench import BASELINES, HELD, TINY, baseline_scores, held_out_items, word_coverage
from groundmill.model.config import load_config
from groundmill.model.synthetic import write_split
from groundmill.shards import iter_shard


def test_held_out_pairs_never_train_and_the_oracle_fails_on_relations(tmp_path):
    write_split(tmp_path / "train", images=40, videos=6, seed=1)
    write_split(tmp_path / "val", images=30, videos=6, seed=2, held_out=True)
    for tar in (tmp_path / "train").rglob("*.tar"):
        for _, files in iter_shard(tar):
            record = json.loads(files["json"])
            labels = [o["labels"][0] for o in record.get("objects", [])]
            labels += [t["labels"][0] for t in record.get("tracks", [])]
            assert not HELD & set(labels)
    cfg = load_config(TINY, [f"data.val=[{{path: {tmp_path / 'val'}}}]"])
    items = held_out_items(cfg)
    refs = items["referring"]
    assert sum(it["relational"] for it in refs) > len(refs) / 2 > 0 and items["video_referring"]
    base = baseline_scores(items)
    assert set(base) == set(BASELINES)
    oracle = base["colour_shape_oracle"]
    # The first object matching both words is right whenever the pair is unique, and only then.
    for it in refs:
        right = np.array_equal(it["baselines"]["colour_shape_oracle"][0], it["sample"]["masks"][0][0])
        assert right or it["relational"]
    assert oracle["relational_ciou"] < 0.75 and oracle["jf"] < 0.8
    assert base["all_objects"]["ciou"] < oracle["ciou"] and base["colour_only"]["ciou"] <= oracle["ciou"]
    # The selection figures tell "finds every object" (all on objects, too large, never a hit) from
    # "selects the target" (the oracle hits at least every unique pair).
    unique = 1 - sum(it["relational"] for it in refs) / len(refs)
    assert base["all_objects"]["on_objects"] == 1.0 and base["all_objects"]["area_ratio"] > 2
    assert base["all_objects"]["hit_rate"] < 0.05 <= unique <= oracle["hit_rate"]
    assert oracle["area_ratio"] == 1.0


def test_word_coverage_tells_colour_bound_shape_words_apart(tmp_path):
    """The one-word diagnostic: a predictor that finds every object a word names covers all of them; one
    that sees a shape only in the colours it was trained with covers the seen pairs and no held-out one."""
    write_split(tmp_path / "val", images=12, videos=0, seed=2, held_out=True)
    cfg = load_config(TINY, [f"data.val=[{{path: {tmp_path / 'val'}}}]"])
    words = held_out_items(cfg)["words"]
    assert {it["word"] for it in words} >= {"triangle", "red"}

    def named(it, seen_only=False):
        picks = [m for n, m in zip(it["names"], it["masks"], strict=True) if it["word"] in n.split()
                 and not (seen_only and it["word"] == n.split()[1] and n in HELD)]  # fmt: skip
        return np.logical_or.reduce(picks) if picks else np.zeros_like(it["masks"][0])

    exact = word_coverage([named(it) for it in words], words)
    assert exact == dict.fromkeys(
        ["colour_word_held", "colour_word_seen", "shape_word_held", "shape_word_seen"], 1.0
    )
    bound = word_coverage([named(it, seen_only=True) for it in words], words)
    assert bound["shape_word_held"] == 0.0 and bound["shape_word_seen"] == bound["colour_word_held"] == 1.0
