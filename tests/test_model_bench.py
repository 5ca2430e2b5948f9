"""The bench needs the words: the compositional split is held out, and reading the colour and shape
words fails on the relational targets."""

import json

import numpy as np

from groundmill.model.bench import BASELINES, TINY, held_out_items, scores
from groundmill.model.config import load_config
from groundmill.model.synthetic import HELD_OUT, write_split
from groundmill.shards import iter_shard


def test_held_out_pairs_never_train_and_the_oracle_fails_on_relations(tmp_path):
    write_split(tmp_path / "train", images=40, videos=6, seed=1)
    write_split(tmp_path / "val", images=30, videos=6, seed=2, held_out=True)
    held = {f"{c} {s}" for c, s in HELD_OUT}
    for tar in (tmp_path / "train").rglob("*.tar"):
        for _, files in iter_shard(tar):
            record = json.loads(files["json"])
            labels = [o["labels"][0] for o in record.get("objects", [])]
            labels += [t["labels"][0] for t in record.get("tracks", [])]
            assert not held & set(labels)
    cfg = load_config(TINY, [f"data.val=[{{path: {tmp_path / 'val'}}}]"])
    items = held_out_items(cfg)
    refs = items["referring"]
    assert sum(it["relational"] for it in refs) > len(refs) / 2 > 0 and items["video_referring"]
    base = {
        name: scores({t: [it["baselines"][name] for it in g] for t, g in items.items()}, items)
        for name in BASELINES
    }
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
