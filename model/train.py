"""`groundmill train CONFIG [key=value ...] [--resume DIR|auto]`: CPU or one GPU in-process, several GPUs
under torchrun (DDP). Checkpoints are safetensors (model) + a weights_only torch file (optimizer, RNG)
+ JSON (step, schedule, data position), enough for an exact resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import ProcessorMixin

from groundmill.model.config import OptimConfig, TrainConfig, load_config, to_dict
from groundmill.model.data import train_loader
from groundmill.model.losses import total_loss
from groundmill.model.mllm import load_processor
from groundmill.model.modeling import X2SamModel, configure_trainable
from groundmill.model.tokenizer import trainer_processor

CKPT_DIR = "checkpoints"


def setup_device(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def lr_at(step: int, o: OptimConfig, seconds: float = 0.0) -> float:
    """Linear warmup, then cosine down to min_lr_ratio * lr at max_steps, or at max_seconds of wall
    clock when that budget is set and comes first (a shared machine's speed is not known in advance)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
    if o.max_seconds > 0:
        progress = max(progress, seconds / o.max_seconds)
    progress = min(1.0, progress)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms and biases
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95))


def build_model(cfg: TrainConfig, processor: ProcessorMixin) -> X2SamModel:
    torch.manual_seed(cfg.seed)
    model = X2SamModel(cfg, processor)
    configure_trainable(model, cfg)
    return model


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters only: frozen ones come back from their pretrained source (or the seeded
    init) when the model is rebuilt, so a checkpoint of a LoRA-tuned 3B VLM holds megabytes, not its base."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: X2SamModel, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    processor: ProcessorMixin, cfg: TrainConfig) -> None:  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(trained_weights(model), str(tmp / "model.safetensors"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "train_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), tmp / "config.yaml")
    processor.save_pretrained(str(tmp))
    if path.exists():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    tmp.rename(path)  # a checkpoint dir either is complete or does not exist


def load_checkpoint(path: Path, model: X2SamModel, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Weights (and optimizer + RNG state when an optimizer is given) from a checkpoint; its state.json."""
    _, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path} has weights this model lacks: {unexpected[:5]}")
    if optimizer is not None:
        saved = torch.load(path / "train_state.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return json.loads((path / "state.json").read_text())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted((Path(out_dir) / CKPT_DIR).glob("step-[0-9]*[0-9]"))
    return found[-1] if found else None


def rank_summary(model: torch.nn.Module, loss: float, device: torch.device) -> dict[str, float]:
    """The loss averaged over ranks, and a checksum of the trained weights (equal on every rank while DDP
    keeps them in sync). Collective: every rank calls it at the same step."""
    mean = torch.tensor(loss, dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    checksum = sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad)
    return {"global_loss": mean.item() / dist.get_world_size(), "weights": float(checksum)}


def gather_positions(positions: dict[str, dict], rank: int, world: int) -> dict[str, dict]:
    """Every rank's stream positions, by rank (collective: every rank calls it at the same step)."""
    if world == 1:
        return {"0": positions}
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, positions)
    return {str(r): p for r, p in enumerate(gathered)}


class MetricsLog:
    """JSONL per rank (rank 0: metrics.jsonl, others metrics-rank{r}.jsonl, their own batches' losses);
    TensorBoard event files too on rank 0 when tensorboard is installed."""

    def __init__(self, out_dir: Path, rank: int = 0):
        name = "metrics.jsonl" if rank == 0 else f"metrics-rank{rank}.jsonl"
        self.file = open(out_dir / name, "a")  # noqa: SIM115 (closed in close())
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                pass

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Train to cfg.optim.max_steps (or the time budget); returns the final checkpoint dir."""
    rank, world, device = setup_device(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out) if resume == "auto" else Path(resume) if resume else None
    processor = load_processor(ckpt) if ckpt else trainer_processor(cfg)
    model = build_model(cfg, processor).to(device).train()  # from_pretrained hands back eval mode
    o = cfg.optim
    optimizer = make_optimizer(model, o)
    state = {"step": 0, "batches": 0, "seconds": 0.0}
    if ckpt:
        state = load_checkpoint(ckpt, model, optimizer)
    ddp = DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    # The stream resumes from the stored positions of this rank's workers: no replay.
    positions: dict[str, dict] = state.get("data", {}).get(str(rank), {})
    remaining = o.max_steps * o.grad_accum - state["batches"]
    batches = iter(train_loader(cfg, processor, remaining, positions, state["batches"]))
    log = MetricsLog(out, rank)
    bf16 = cfg.precision == "bf16" or cfg.precision == "auto" and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=o.max_steps, initial=state["step"], disable=rank != 0, mininterval=5, desc="train")
    started = time.perf_counter() - state["seconds"]
    done = state["step"] >= o.max_steps
    while not done:
        lr = lr_at(state["step"], o, state["seconds"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        for micro in range(o.grad_accum):
            raw = next(batches)
            position = raw.pop("position")
            positions[str(position["stream"])] = position
            batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
            state["batches"] += 1
            # DDP all-reduces gradients only on the last micro-batch.
            sync = micro == o.grad_accum - 1 or world == 1
            with autocast, contextlib.nullcontext() if sync else ddp.no_sync():
                losses = total_loss(ddp(batch), batch, cfg.loss)
                (losses["loss"] / o.grad_accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / o.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["seconds"] = time.perf_counter() - started
        done = state["step"] >= o.max_steps or 0 < o.max_seconds <= state["seconds"]
        if world > 1:  # every rank stops at the same step, whatever its own clock says
            flag = torch.tensor(float(done), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            done = bool(flag.item())
        bar.update(1)
        if state["step"] % cfg.log_every == 0 or done:
            extra = rank_summary(model, sums["loss"], device) if world > 1 else {}
            log.write(state["step"], {**sums, **extra, "lr": lr, "seconds": round(state["seconds"], 2)})
            bar.set_postfix(loss=f"{sums['loss']:.3f}")
        if state["step"] % cfg.ckpt_every == 0 or done:
            state["data"] = gather_positions(positions, rank, world)
            if rank == 0:
                save_checkpoint(
                    out / CKPT_DIR / f"step-{state['step']:07d}", model, optimizer, state, processor, cfg
                )
    bar.close()
    log.close()
    if world > 1:
        dist.barrier()
    return out / CKPT_DIR / f"step-{state['step']:07d}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="groundmill train", description="Train the X2SAM-style model on shards.")
    p.add_argument("config", help="YAML config (see manifests/train_tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", help="checkpoint dir, or 'auto' for the latest under out_dir")
    a = p.parse_intermixed_args(argv)
    path = train(load_config(a.config, a.overrides), a.resume)
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    main()
