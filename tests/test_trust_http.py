"""Trust, HTTP LLM calls: the timeout is a deadline for the whole request, not per read, and a
response body has a maximum size (issue 16, finding 13). The server is a FastAPI test double on
loopback that trickles a byte at a time or answers with a huge body.

No `from __future__ import annotations` here: FastAPI must resolve the handler's `Request` annotation."""

import asyncio
import time

import pytest

from groundmill.stages.llm import FINISH_ERROR, FINISH_STOP, LLMConfig, SamplingParams, make_backend
from groundmill.tests.llm_servers import serving


@pytest.fixture(scope="module")
def hostile_server():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        model = (await request.json())["model"]
        if model == "trickle":  # a byte every 0.2 s for 8 s: each read is quick, the request is not

            async def drip():
                for _ in range(40):
                    yield b" "
                    await asyncio.sleep(0.2)

            return StreamingResponse(drip(), media_type="application/json")
        if model == "huge":
            return PlainTextResponse("x" * (3 * 2**20))
        return JSONResponse({"choices": [{"message": {"content": "A dog."}, "finish_reason": "stop"}]})

    with serving(app) as base_url:
        yield base_url


def _generate(base_url: str, model: str, **kw):
    backend = make_backend(LLMConfig(backend="http", base_url=base_url, request_retries=0, **kw), model)
    backend.setup()
    try:
        return backend.generate(["x"], SamplingParams(max_new_tokens=4))[0]
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_a_trickling_server_is_cut_off_at_the_request_deadline(hostile_server):
    start = time.monotonic()
    gen = _generate(hostile_server, "trickle", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert gen.finish_reason == FINISH_ERROR and "timeout" in gen.error
    assert elapsed < 3.0, f"a 1 s timeout held the request for {elapsed:.1f} s"


def test_a_response_over_the_size_limit_is_refused(hostile_server):
    gen = _generate(hostile_server, "huge", max_response_bytes=2**20)
    assert gen.finish_reason == FINISH_ERROR and "max_response_bytes" in gen.error
    ok = _generate(hostile_server, "fine", max_response_bytes=2**20)
    assert ok.finish_reason == FINISH_STOP and ok.text == "A dog."
