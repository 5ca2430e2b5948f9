"""Shared fixtures. Ray starts once per test session (it costs seconds), on 2 CPUs like CI.

No `from __future__ import annotations` here: FastAPI must resolve the fault server's `Request`
annotation."""

import asyncio
import os

import pytest

from groundmill.tests.llm_servers import serving

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Many model actors start at once on 2 cores; Ray's default 60 s registration timeout kills slow ones.
os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fault_server():
    """A test double of a misbehaving OpenAI-compatible endpoint: the requested model name picks the
    fault (garbage bodies, no stop, timeouts, 503s)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    hits: dict[str, int] = {}
    inflight = {"now": 0, "max": 0}

    def completion(text: str, finish: str) -> dict:
        return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"completion_tokens": 3}}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        model = (await request.json())["model"]
        hits[model] = hits.get(model, 0) + 1
        if model == "garbage":
            return PlainTextResponse("<html>oops", status_code=200)
        if model == "wrong-shape":
            return JSONResponse({"choices": []})
        if model == "no-stop":
            return JSONResponse(completion("A dog sat on", "length"))
        if model == "slow":
            await asyncio.sleep(3)
            return JSONResponse(completion("late.", "stop"))
        if model == "count":  # hold each request a moment and record how many overlap
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
            await asyncio.sleep(0.3)
            inflight["now"] -= 1
        if model == "flaky" and hits[model] <= 2:
            return PlainTextResponse("busy", status_code=503)
        return JSONResponse(completion("A dog.", "stop"))

    with serving(app) as base_url:
        yield base_url, hits, inflight
