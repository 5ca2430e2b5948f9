"""The in-process transformers backend: batched generation with left padding, finish reasons, GGUF
conversion cache; on the tiny random-weight Llama (fast) and on the real SmolLM2."""

from __future__ import annotations

import pytest

from groundmill.checkpoints import dequantised_gguf
from groundmill.stages.llm import FINISH_LENGTH, FINISH_STOP, LLMConfig, SamplingParams, make_backend
from groundmill.stages.llm.hf import smollm2_gguf
from groundmill.stages.llm.vllm import sampling_dict

SHORT = [{"role": "user", "content": "Name one colour. Answer with one word."}]
LONG = [{"role": "user", "content": "Here is a long question about many things. " * 5 + "Say yes."}]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


def backend_for(model_id: str):
    backend = make_backend(LLMConfig(backend="transformers", batch_size=4), model_id)
    backend.setup()
    return backend


def test_gguf_conversion_is_cached_by_file_hash():
    first = dequantised_gguf(smollm2_gguf())
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert dequantised_gguf(smollm2_gguf()) == first and first.name.startswith("SmolLM2-135M-Instruct")


def test_tiny_model_batches_like_single_prompts_and_reports_length():
    backend = backend_for("tiny")
    batched = backend.generate([SHORT, LONG, "hi"], GREEDY)
    alone = [backend.generate([p], GREEDY)[0] for p in (SHORT, LONG, "hi")]
    assert [g.text for g in batched] == [g.text for g in alone]  # left padding does not change answers
    for g in batched:  # random weights almost never emit EOS in 6 tokens: cut at the limit
        assert (g.finish_reason, g.tokens) == (FINISH_LENGTH, 6) or g.finish_reason == FINISH_STOP


def test_stop_strings_end_a_generation():
    backend = backend_for("tiny")
    free = backend.generate([SHORT], GREEDY)[0].text
    assert len(free) > 2
    stop = free[1:3]
    cut = backend.generate([SHORT], SamplingParams(max_new_tokens=6, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == FINISH_STOP and stop not in cut.text and free.startswith(cut.text)


@pytest.mark.slow
def test_real_smollm2_batches_with_left_padding():
    backend = backend_for("smollm2")
    batched = backend.generate([SHORT, LONG], GREEDY)
    alone = backend.generate([SHORT], GREEDY)
    assert batched[0].text == alone[0].text and batched[0].text.strip()
    assert all(g.tokens <= 6 and g.finish_reason in (FINISH_STOP, FINISH_LENGTH) for g in batched)


def test_vllm_sampling_params_mapping():
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, stop=["\n"], seed=3)
    assert sampling_dict(params) == {
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 3,
    }
