"""Model loading shared by the stages: hub ids and local paths load unchanged; `tiny` builds the same
class from a small config with seeded random weights (and the run record says so)."""

from __future__ import annotations

from pathlib import Path

import torch

from groundmill.stages.base import ModelSpec, Resources

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_for(spec: ModelSpec, resources: Resources, cuda_available: bool | None = None) -> torch.device:
    """`auto` picks the GPU only when the stage's actor was given one (`resources` are the actor's:
    a group's for a grouped stage) and one is visible."""
    if spec.device != "auto":
        return torch.device(spec.device)
    visible = torch.cuda.is_available() if cuda_available is None else cuda_available
    return torch.device("cuda" if resources.num_gpus > 0 and visible else "cpu")


def dtype_for(spec: ModelSpec, device: torch.device) -> torch.dtype:
    # Half precision on CPU is slow and poorly supported; keep fp32 there whatever was asked.
    return _DTYPES[spec.dtype] if device.type == "cuda" else torch.float32


def seeded(seed: int, name: str) -> torch.Generator:
    """Seed torch for building a random-init model, so every actor builds identical weights."""
    offset = sum(name.encode()) % 10_000
    torch.manual_seed(seed + offset)
    return torch.default_generator


def local_path(spec: ModelSpec) -> Path | None:
    path = Path(spec.id).expanduser()
    return path if path.exists() else None
