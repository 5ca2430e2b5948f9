"""LLM throughput per backend and the share of the language stages' time spent generating.

    .venv/bin/python -m groundmill.benchmarks.bench_llm [--samples 4] [--max-new-tokens 32] [--backends transformers,http]

For each available backend (in-process transformers; HTTP to a `transformers serve` started here on
127.0.0.1; vLLM through ray.data.llm when vllm is installed) the real SmolLM2-135M-Instruct writes
dense captions for hand-built image records, which then go through verification, referring
expressions and GCG export in-process. Reports generated tokens/s and generation time / total time
of that language-stage chain. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from groundmill.checkpoints import dequantised_gguf
from groundmill.schema import encode_mask
from groundmill.stages.base import ModelSpec, Sample
from groundmill.stages.dense_caption import DenseCaptioning
from groundmill.stages.gcg import GCGExport
from groundmill.stages.llm import LLMConfig
from groundmill.stages.llm.hf import smollm2_gguf
from groundmill.stages.refexp import ReferringExpressions
from groundmill.stages.scene_graph import SceneGraph
from groundmill.stages.verification import Verification

H, W = 240, 320
SCENES = [
    [("dog", [20, 120, 120, 220], ["brown"]), ("bench", [130, 110, 300, 230], ["wooden"]), ("tree", [200, 0, 310, 110], [])],
    [("cup", [100, 60, 150, 120], ["white"]), ("table", [40, 100, 300, 230], ["wooden"]), ("window", [0, 0, 90, 90], [])],
    [("car", [10, 100, 200, 200], ["red"]), ("person", [220, 60, 270, 220], []), ("road", [0, 180, 320, 240], [])],
    [("cat", [60, 80, 180, 200], ["orange"]), ("sofa", [0, 120, 320, 240], ["grey"]), ("lamp", [250, 10, 300, 120], [])],
]  # fmt: skip


def make_samples(n: int) -> list[Sample]:
    samples = []
    for k in range(n):
        objects = []
        for i, (label, box, attrs) in enumerate(SCENES[k % len(SCENES)], start=1):
            mask = np.zeros((H, W), bool)
            mask[box[1] : box[3], box[0] : box[2]] = True
            objects.append({"id": i, "bbox": [float(v) for v in box], "labels": [label], "attributes": attrs,
                            "score": 0.9, "detectors": ["bench"], "segmentation": encode_mask(mask),
                            "depth": 0.2 + 0.2 * i})  # fmt: skip
        record = {"key": f"{k:024x}", "media": {"type": "image", "ext": "jpg", "width": W, "height": H},
                  "landmark": {"category": "outdoor", "fine": "park", "score": 1.0}, "objects": objects,
                  "provenance": {}}  # fmt: skip
        samples.append(
            Sample(
                uri=f"bench/{k}", key=record["key"], media_type="image", data=b"", frames=[], record=record
            )
        )
    return samples


class TimedBackend:
    """Wraps a backend's generate to add up its wall time and generated tokens."""

    def __init__(self, backend):
        self.backend, self.seconds, self.tokens = backend, 0.0, 0

    def generate(self, prompts, params):
        start = time.perf_counter()
        gens = self.backend.generate(prompts, params)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(g.tokens for g in gens)
        return gens


def serve(model_dir: Path, port: int) -> subprocess.Popen:
    import httpx

    exe = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen(
        [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), str(model_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("transformers serve did not become healthy in 300 s")


def run_backend(llm: LLMConfig, model_id: str, samples: list[Sample], max_new_tokens: int, verifier) -> dict:
    params = DenseCaptioning.Params(llm=llm, max_new_tokens=max_new_tokens, attempts=1, accept_truncated=True)
    captioner = DenseCaptioning(params, ModelSpec(id=model_id))
    start = time.perf_counter()
    captioner.setup()
    load_s = time.perf_counter() - start
    timed = captioner.backend = TimedBackend(captioner.backend)
    chain = [SceneGraph(), captioner, verifier, ReferringExpressions(), GCGExport()]
    start = time.perf_counter()
    for stage in chain:
        stage.process([s for s in samples if s.ok])
    total = time.perf_counter() - start
    timed.backend.close()
    captions = sum("dense_caption" in s.record for s in samples)
    return {
        "load_s": round(load_s, 2),
        "tokens": timed.tokens,
        "generate_s": round(timed.seconds, 2),
        "tokens_per_s": round(timed.tokens / timed.seconds, 2) if timed.seconds else 0.0,
        "stage_chain_s": round(total, 2),
        "generation_share": round(timed.seconds / total, 3) if total else 0.0,
        "captions": captions,
        "gcg_records": sum("gcg" in s.record for s in samples),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--backends", default="transformers,http,vllm")
    ap.add_argument("--port", type=int, default=18531)
    args = ap.parse_args()

    verifier = Verification()
    verifier.setup()
    results: dict[str, dict] = {}
    for name in args.backends.split(","):
        samples = make_samples(args.samples)
        if name == "transformers":
            results[name] = run_backend(
                LLMConfig(batch_size=args.samples), "smollm2", samples, args.max_new_tokens, verifier
            )
        elif name == "http":
            model_dir = dequantised_gguf(smollm2_gguf())
            proc = serve(model_dir, args.port)
            try:
                llm = LLMConfig(
                    backend="http", base_url=f"http://127.0.0.1:{args.port}/v1", max_concurrency=4
                )
                results[name] = run_backend(llm, str(model_dir), samples, args.max_new_tokens, verifier)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        elif name == "vllm":
            if importlib.util.find_spec("vllm") is None:
                results[name] = {
                    "skipped": "vllm not installed (pip install 'groundmill[vllm]' on a GPU machine)"
                }
            else:
                results[name] = run_backend(
                    LLMConfig(backend="vllm"), "smollm2", samples, args.max_new_tokens, verifier
                )

    cols = [
        "load_s",
        "tokens",
        "generate_s",
        "tokens_per_s",
        "stage_chain_s",
        "generation_share",
        "captions",
        "gcg_records",
    ]
    print(f"{'backend':<14}" + "".join(f"{c:>18}" for c in cols))
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<14}  skipped: {r['skipped']}")
        else:
            print(f"{name:<14}" + "".join(f"{r[c]:>18}" for c in cols))
    print(
        json.dumps(
            {
                "bench": "llm",
                "samples": args.samples,
                "max_new_tokens": args.max_new_tokens,
                "backends": results,
            }
        )
    )


if __name__ == "__main__":
    main()
