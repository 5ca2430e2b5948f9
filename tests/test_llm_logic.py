"""LLM logic without a model: prompt loading and hashing, output parsing, the retry loop."""

from __future__ import annotations

import pytest

from groundmill.prompts import load_prompt
from groundmill.stages.llm import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    LLMConfig,
    LLMUnavailable,
    SamplingParams,
    generate_checked,
    make_backend,
    require_stop,
)
from groundmill.stages.llm.parsing import parse_json_list, parse_phrase, parse_prose
from groundmill.tests.llm_doubles import ScriptedBackend

SHIPPED = ["dense_caption", "extra_context", "verification_checklist", "referring_expression", "gcg_rewrite"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_prompts_load_render_and_hash(name):
    prompt = load_prompt(name)
    fields = {"scene_graph": "Scene: x", "scene": "x", "objects": "a", "caption": "c", "expression": "e"}
    rendered = prompt.render(**fields)
    assert rendered.prompt_id == f"{name}@v{prompt.version}"
    assert rendered.messages[0]["role"] == "system" and rendered.messages[-1]["role"] == "user"
    assert len(rendered.messages) == 2 + 2 * len(prompt.examples)
    assert rendered.template_hash == prompt.template_hash
    other = prompt.render(
        **{**fields, "scene_graph": "Scene: y", "caption": "d", "expression": "f", "scene": "y"}
    )
    assert other.rendered_hash != rendered.rendered_hash and other.template_hash == rendered.template_hash


def test_prompt_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="scene_graph"):
        load_prompt("dense_caption").render()
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nversion: 1\nsystem: s\ntemplate: t\ntemperature: 3\n")
    with pytest.raises(ValueError, match="temperature"):
        load_prompt(str(bad))
    with pytest.raises(FileNotFoundError, match="dense_caption"):
        load_prompt("nope")


def test_parse_prose():
    ok = Generation("Caption: A dog sits.  It is brown. It sleeps. It dreams. It wakes.", FINISH_STOP)
    assert parse_prose(ok, max_sentences=2) == "A dog sits. It is brown."
    cut = Generation("A dog sits. It is bro", FINISH_LENGTH)
    with pytest.raises(ValueError, match="did not stop"):
        parse_prose(cut)
    assert parse_prose(cut, accept_truncated=True) == "A dog sits."
    with pytest.raises(ValueError, match="no complete sentence"):
        parse_prose(Generation("A dog", FINISH_LENGTH), accept_truncated=True)
    with pytest.raises(ValueError, match="scene graph"):
        parse_prose(Generation("The scene graph shows a dog.", FINISH_STOP))
    with pytest.raises(ValueError, match="request failed"):
        require_stop(Generation("", FINISH_ERROR, error="timeout"))


def test_parse_json_list_and_phrase():
    assert parse_json_list(Generation('Sure: ["dog", " bench "]', FINISH_STOP)) == ["dog", "bench"]
    for bad in ('["dog", ', "dog, bench", "[1, 2]", '{"a": 1}'):
        with pytest.raises(ValueError):
            parse_json_list(Generation(bad, FINISH_STOP))
    assert parse_phrase(Generation('"the brown dog."\nmore', FINISH_STOP)) == "the brown dog"
    with pytest.raises(ValueError, match="words"):
        parse_phrase(Generation("a " * 20, FINISH_STOP))


def test_generate_checked_retries_only_rejected_then_drops_with_reason():
    backend = ScriptedBackend(
        {
            "good": [Generation("Fine.", FINISH_STOP)],
            "late": [Generation("cut", FINISH_LENGTH), Generation("Now fine.", FINISH_STOP)],
            "never": [Generation("x", FINISH_LENGTH), Generation("", FINISH_ERROR, error="HTTP 500"),
                      Generation("y", FINISH_LENGTH)],
        }
    )  # fmt: skip
    results = generate_checked(
        backend, ["good", "late", "never"], SamplingParams(seed=1), require_stop, attempts=3
    )
    assert [r.value for r in results] == ["Fine.", "Now fine.", None]
    assert [r.attempts for r in results] == [1, 2, 3]
    assert not results[2].ok and "did not stop" in results[2].reason
    assert backend.calls == ["good", "late", "never", "late", "never", "never"]


def test_unknown_backend_fails_fast():
    with pytest.raises(LLMUnavailable, match="unknown LLM backend 'gpt'"):
        make_backend(LLMConfig(backend="gpt"), "x")


def test_vllm_backend_without_vllm_says_how_to_install():
    backend = make_backend(LLMConfig(backend="vllm"), "smollm2")
    with pytest.raises(LLMUnavailable, match=r"groundmill\[vllm\]"):
        backend.setup()


def test_http_backend_needs_a_base_url():
    with pytest.raises(LLMUnavailable, match="base_url"):
        make_backend(LLMConfig(backend="http"), "m").setup()


class CountingEngineDouble:
    """Test double for `vllm.LLM`: counts constructions and batches, answers every prompt."""

    built = 0

    def __init__(self, model_id, engine_kwargs):
        CountingEngineDouble.built += 1
        self.batches = []

    def chat(self, conversations, sampling):
        self.batches.append(len(conversations))
        return [("A dog sits beside a red ball.", "stop", 7) for _ in conversations]


def test_vllm_engine_is_built_once_per_actor_over_many_batches(monkeypatch):
    import pyarrow as pa

    import groundmill.stages.llm.vllm as vllm_backend
    from groundmill.pipeline.config import StageConfig, stage_params
    from groundmill.pipeline.graph import StageActor
    from groundmill.stages import stage_class
    from groundmill.stages.base import ROW_SCHEMA, ModelSpec
    from groundmill.tests.stage_samples import image_sample

    monkeypatch.setattr(vllm_backend, "build_engine", CountingEngineDouble)
    CountingEngineDouble.built = 0
    specs = []
    for name, params in (("scene_graph", {}), ("dense_caption", {"llm": {"backend": "vllm"}, "attempts": 1})):
        cls = stage_class(name)
        specs.append(
            (name, StageConfig(model=ModelSpec(id="some/llm"), params=stage_params(cls, params, name)), cls)
        )
    actor = StageActor(specs, seed=0)
    objects = [
        {
            "id": 0,
            "bbox": [4, 4, 40, 40],
            "labels": ["dog"],
            "attributes": [],
            "score": 0.9,
            "detectors": ["x"],
        }
    ]
    for batch in range(5):
        samples = [image_sample(10 * batch + i) for i in range(3)]
        for s in samples:
            s.record["objects"] = objects
        out = actor(pa.Table.from_pylist([s.to_row() for s in samples], schema=ROW_SCHEMA)).to_pylist()
        assert all(r["status"] == "ok" and '"dense_caption"' in r["record"] for r in out)
    engine = actor.stages[1][1].backend.engine
    assert CountingEngineDouble.built == 1 and len(engine.batches) == 5
    StageActor(specs, seed=0)  # a second actor: its own engine
    assert CountingEngineDouble.built == 2
