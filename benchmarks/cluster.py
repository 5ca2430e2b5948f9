"""GPU busy share, the graph operators' resource overrides, and the cluster model of SCALING.md."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

from groundmill.benchmarks.measure import run_pipeline_measured


def gpu_busy_share(manifest: str, inputs: Path, work: Path) -> dict[str, Any]:
    """Device utilisation sampled with nvidia-smi during a pipeline run with GPU stages."""
    try:
        import torch

        has_gpu = torch.cuda.is_available() and shutil.which("nvidia-smi") is not None
    except ImportError:
        has_gpu = False
    if not has_gpu:
        return {"skipped": "no CUDA device"}
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True,
            )  # fmt: skip
            samples.extend(float(v) for v in out.stdout.split() if v.strip())
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        r = run_pipeline_measured(manifest, inputs, work, "gpu", gpu_overrides(manifest))
    finally:
        stop.set()
        thread.join()
    busy = r["stage_busy_s"]
    wall = r["seconds"] / r["inputs"]
    return {
        "device_utilisation_mean": float(np.mean(samples)) / 100 if samples else None,
        "stage_busy_share": {s: t / wall for s, t in busy.items()},
        "samples_per_s": r["samples_per_s"],
    }


def model_stages(manifest: str) -> list[str]:
    from groundmill.pipeline.config import load_config
    from groundmill.stages import stage_class

    cfg = load_config(manifest, ["inputs=[.]"])
    return [n for n, s in cfg.stages.items() if s.enabled and stage_class(s.type or n).uses_model]


def segment_overrides(manifest: str, names: set[str] | None, **resources: float) -> list[str]:
    """Overrides setting resources of the named graph operators (a group, or a stage alone), or of
    every operator that holds a model when `names` is None."""
    from groundmill.pipeline.config import load_config, segments

    cfg = load_config(manifest, ["inputs=[.]"])
    out = []
    for seg in segments(cfg):
        if (seg.name in names) if names is not None else seg.uses_model:
            prefix = f"groups.{seg.name}" if seg.name in cfg.groups else f"stages.{seg.name}.resources"
            out += [f"{prefix}.{key}={value}" for key, value in resources.items()]
    return out


def busiest_segments(manifest: str, busy_s: dict[str, float], k: int) -> list[str]:
    """The `k` graph operators with the most busy time per sample (their stages' sum)."""
    from groundmill.pipeline.config import load_config, segments

    busy = {
        seg.name: sum(busy_s.get(s, 0.0) for s in seg.stages)
        for seg in segments(load_config(manifest, ["inputs=[.]"]))
    }
    return sorted(busy, key=busy.get, reverse=True)[:k]


def gpu_overrides(manifest: str) -> list[str]:
    return segment_overrides(manifest, None, num_gpus=0.1)


def predict_throughput(
    busy_s: dict[str, float], gpu_stages: list[str], gpus: int, cpus: int, efficiency: float
) -> float:
    """The cluster model of SCALING.md: samples/s = efficiency * min(GPUs / GPU-seconds per sample,
    CPU cores / CPU-seconds per sample)."""
    gpu_work = sum(t for s, t in busy_s.items() if s in gpu_stages)
    cpu_work = sum(t for s, t in busy_s.items() if s not in gpu_stages)
    limits = [gpus / gpu_work if gpu_work else float("inf"), cpus / cpu_work if cpu_work else float("inf")]
    return efficiency * min(limits)
