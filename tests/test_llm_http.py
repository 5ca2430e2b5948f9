"""The HTTP backend against real servers on loopback: `transformers serve` with the real SmolLM2
(session fixture), and a small FastAPI app that is a test double for faults (garbage bodies, no
stop, timeouts, 503s). The HTTP captioner goes to the real server through a recording pass-through.

No `from __future__ import annotations` here: FastAPI must resolve the handler's `Request` annotation."""

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from groundmill.checkpoints import dequantised_gguf
from groundmill.stages.base import SampleError
from groundmill.stages.llm import (
    FINISH_ERROR,
    FINISH_STOP,
    LLMConfig,
    SamplingParams,
    generate_checked,
    make_backend,
    require_stop,
)
from groundmill.stages.llm.hf import smollm2_gguf
from groundmill.tests.llm_servers import free_port, serving
from groundmill.tests.stage_samples import build, image_sample

pytestmark = pytest.mark.slow
PROMPT = [{"role": "user", "content": "Name one colour. Answer with one word."}]


def wait_healthy(url: str, proc: subprocess.Popen | None, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:  # bounded: the fixture fails instead of hanging
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {limit_s}s")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return dequantised_gguf(smollm2_gguf())


@pytest.fixture(scope="session")
def served_smollm2(smollm2_dir, tmp_path_factory):
    """`transformers serve` on 127.0.0.1 serving the real SmolLM2 (converted once to safetensors)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    exe = Path(sys.executable).with_name("transformers")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), str(smollm2_dir)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, 240)
        yield f"http://127.0.0.1:{port}/v1", str(smollm2_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_http_backend_against_real_server(served_smollm2):
    base_url, model = served_smollm2
    backend = make_backend(
        LLMConfig(backend="http", base_url=base_url, max_concurrency=2, timeout_s=120), model
    )
    backend.setup()
    try:
        gens = backend.generate([PROMPT, "Say hello."], SamplingParams(max_new_tokens=8, temperature=0.0))
    finally:
        backend.close()
    assert len(gens) == 2
    for g in gens:
        assert g.finish_reason != FINISH_ERROR, g.error
        assert g.text.strip() and 0 < g.tokens <= 8


def _backend(base_url: str, model: str, **kw):
    backend = make_backend(LLMConfig(backend="http", base_url=base_url, **kw), model)
    backend.setup()
    return backend


@pytest.mark.parametrize(
    ("model", "reason"),
    [("garbage", "not JSON"), ("wrong-shape", "malformed chat completion"), ("no-stop", "did not stop")],
)
def test_malformed_output_is_retried_then_recorded(fault_server, model, reason):
    base_url, hits, _ = fault_server
    backend = _backend(base_url, model, request_retries=0)
    before = hits.get(model, 0)
    results = generate_checked(
        backend, ["describe"], SamplingParams(max_new_tokens=8), require_stop, attempts=3
    )
    backend.close()
    assert not results[0].ok and reason in results[0].reason and results[0].attempts == 3
    assert hits[model] - before == 3  # one request per attempt: malformed bodies are not transport retries


def test_timeouts_and_503_are_retried_with_a_bound(fault_server):
    base_url, hits, _ = fault_server
    slow = _backend(base_url, "slow", timeout_s=0.5, request_retries=1)
    gen = slow.generate(["x"], SamplingParams(max_new_tokens=4))[0]
    slow.close()
    assert gen.finish_reason == FINISH_ERROR and "timeout" in gen.error and "2 tries" in gen.error
    flaky = _backend(base_url, "flaky", request_retries=2)
    gen = flaky.generate(["x"], SamplingParams(max_new_tokens=4))[0]
    flaky.close()
    assert gen.finish_reason == FINISH_STOP and gen.text == "A dog." and hits["flaky"] == 3


def test_concurrency_is_bounded_and_order_kept(fault_server):
    base_url, hits, inflight = fault_server
    backend = _backend(base_url, "count", max_concurrency=3)
    gens = backend.generate([f"p{i}" for i in range(7)], SamplingParams(max_new_tokens=4))
    backend.close()
    assert [g.text for g in gens] == ["A dog."] * 7 and hits["count"] == 7
    assert 2 <= inflight["max"] <= 3  # requests overlap, never more than max_concurrency at once


# ---------------------------------------------------------------------------------------------------
# The HTTP captioner: images as base64 `image_url` parts. SmolLM2 is a text model and ignores the image
# (`transformers serve` accepts the parts); a pass-through in front of it keeps each request body.


@pytest.fixture(scope="module")
def recording_proxy(served_smollm2):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    upstream, _ = served_smollm2
    app = FastAPI()
    bodies: list[dict] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        bodies.append(body)
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.post(f"{upstream}/chat/completions", json=body)
        return JSONResponse(response.json(), status_code=response.status_code)

    with serving(app) as base_url:
        yield base_url, bodies


def sent_image(part: dict) -> Image.Image:
    assert part["type"] == "image_url"
    url = part["image_url"]["url"]
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_http_captioner_sends_each_image_and_writes_captions(recording_proxy, served_smollm2):
    base_url, bodies = recording_proxy
    _, model = served_smollm2
    params = {
        "backend": "http",
        "num_captions": 2,
        "generation": {"max_new_tokens": 64, "sample": False},  # greedy: a stable caption
        "llm": {"base_url": base_url, "max_concurrency": 2, "timeout_s": 120},
    }
    stage = build("captions", params, model)
    stage.setup()
    samples = [image_sample(1), image_sample(2, (64, 80))]
    bodies.clear()
    stage.process(samples)

    assert len(bodies) == 4  # one request per caption
    by_size: dict[tuple[int, int], list[dict]] = {}
    for body in bodies:
        assert body["model"] == model and body["temperature"] == 0.0
        [message] = body["messages"]
        image_part, text_part = message["content"]
        assert text_part == {"type": "text", "text": stage.params.instruction}
        by_size.setdefault(sent_image(image_part).size, []).append(body)
    assert sorted(by_size) == [(64, 80), (96, 72)]  # each image, at its own size
    for requests in by_size.values():
        assert len({b["seed"] for b in requests}) == 2  # one seed per caption
    for s in samples:
        captions = s.record["captions"]
        assert 1 <= len(captions) <= 2 and all(c["text"].strip() and c["model"] == model for c in captions)
    prov = stage.provenance()
    assert prov["backend"] == "http" and prov["model"] == model and prov["base_url"] == base_url


def test_http_captioner_without_a_server_is_a_clear_sample_error():
    params = {
        "backend": "http",
        "llm": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "request_retries": 0},
    }
    stage = build("captions", params, "some-vlm")
    stage.setup()
    with pytest.raises(SampleError, match="caption requests failed: .*ConnectError"):
        stage.process([image_sample(3)])


def test_actor_teardown_closes_the_llm_clients(fault_server):
    """A stage actor ending (Ray Data deletes its UDF) closes every LLM backend its stages opened."""
    import gc

    from groundmill.pipeline.config import StageConfig, stage_params
    from groundmill.pipeline.graph import StageActor
    from groundmill.stages import stage_class
    from groundmill.stages.base import ModelSpec

    llm = {"backend": "http", "base_url": fault_server[0]}
    specs = []
    for name, params in (("dense_caption", {"llm": llm}), ("captions", {"backend": "http", "llm": llm})):
        cls = stage_class(name)
        cfg = StageConfig(model=ModelSpec(id="some-model"), params=stage_params(cls, params, name))
        specs.append((name, cfg, cls))
    actor = StageActor(specs, seed=0)
    clients = [actor.stages[0][1].backend.client, actor.stages[1][1].captioner.backend.client]
    assert not any(c.is_closed for c in clients)
    del actor
    gc.collect()
    assert all(c.is_closed for c in clients)
