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


# One small run of the real stages (tiny vision models, the real SmolLM2, real Ray) over images of two
# formats, a video and a duplicate of a broken input: what the export, consumer and report tests read.
GROUNDED_STAGES = """
load: {num_cpus: 0.25}
video: {keyframes: 2}
groups:
  vision: {num_cpus: 0.5, batch_size: 4}
  language: {num_cpus: 0.5, batch_size: 8}
  video: {num_cpus: 0.25, batch_size: 1}
stages:
  detect_owlv2:
    type: detection
    model: {id: tiny}
    group: vision
    params: {detector: owlv2, score_threshold: 0.05, nms_iou: 0.9, max_boxes: 4, classes: [person, red]}
  detect_grounding_dino:
    type: detection
    model: {id: tiny}
    group: vision
    params: {detector: grounding_dino, score_threshold: 0.05, nms_iou: 0.9, max_boxes: 4, classes: [person]}
  masks: {group: vision, model: {id: tiny}}
  voting: {group: vision, params: {min_iou: 0.0, min_dice: 0.0}}
  auto_masks:
    group: vision
    model: {id: tiny}
    params: {points_per_side: 4, pred_iou_thresh: 0.0, stability_score_thresh: 0.0, max_new: 4}
  stuff: {group: vision, model: {id: tiny}, params: {short_side: 64, min_score: 0.0}}
  mask_verification: {group: vision}
  exhaustivity: {group: vision, model: {id: tiny}, params: {score_threshold: 0.05}}
  attributes: {group: vision, model: {id: tiny}, params: {min_attribute_prob: 0.1}}
  captions: {group: vision, model: {id: tiny}, params: {num_captions: 2, generation: {max_new_tokens: 8}}}
  grounding:
    group: vision
    model: {id: sentence-transformers/all-MiniLM-L6-v2}
    params: {min_similarity: -1.0}
  scene_graph: {group: language}
  dense_caption:
    group: language
    model: {id: smollm2}
    params: {max_new_tokens: 32, attempts: 1, accept_truncated: true, on_failure: drop, llm: {backend: transformers, batch_size: 8}}
  verification: {group: language, params: {max_hallucination_rate: 1.0}}
  # Random-weight masks are rejected by the verifier: the language stages use them all here.
  refexp: {group: language, params: {verified_only: false}}
  gcg: {group: language, params: {verified_only: false}}
  tracking:
    group: video
    model: {id: tiny}
    # Random-weight SAM2 gives masks of a few pixels: count them as visible.
    params: {chunk_frames: 6, min_iou: 0.5, max_missing: 4, max_tracks: 3, min_area: 1}
  video_expressions: {group: video, params: {rewrite: false}}
"""


@pytest.fixture(scope="session")
def grounded_run(tmp_path_factory, ray_local):
    """(output dir, input dir) of one run over 3 images (PNG and JPEG), a 12-frame video, a broken JPEG
    and a copy of it."""
    from groundmill.pipeline.config import load_config
    from groundmill.pipeline.demo_data import write_shapes_video
    from groundmill.pipeline.run import run_pipeline
    from groundmill.tests.media_factory import rgb_jpeg, truncated_jpeg
    from groundmill.tests.stage_samples import png

    tmp = tmp_path_factory.mktemp("grounded")
    inputs = tmp / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(png(0, (96, 72)))
    (inputs / "b.png").write_bytes(png(1, (80, 80)))
    (inputs / "c.jpg").write_bytes(rgb_jpeg(3))
    (inputs / "broken.jpg").write_bytes(truncated_jpeg())
    (inputs / "copy_of_broken.jpg").write_bytes(truncated_jpeg())
    write_shapes_video(inputs / "clip.mp4", num_frames=12, size=(96, 64), enter_at=5)
    manifest = tmp / "m.yaml"
    manifest.write_text(
        f"inputs: [{inputs}]\noutput: {{dir: {tmp / 'out'}, shard_max_samples: 8}}\n" + GROUNDED_STAGES
    )
    run_pipeline(load_config(manifest))
    return tmp / "out", inputs
