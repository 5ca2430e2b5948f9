"""The trainer's whole configuration: one dataclass tree, loaded from YAML with omegaconf.

Structured configs make omegaconf reject unknown keys by name (``Key 'lrr' not in 'OptimConfig'``), the
failure mode X2SAM users hit with 4,000-line configs. Overrides are ``key.sub=value`` dotlist strings.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Every task the data loader can make from a record (see model/tasks.py).
TASKS = ("referring", "gcg", "interactive", "vgd", "video_referring", "video_object")


@dataclass
class LLMConfig:
    # "tiny" builds a random-init Qwen2 from the fields below; anything else is a hub id or local path
    # loaded unchanged with from_pretrained.
    name: str = "tiny"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # Weight init std of the tiny LLM. transformers' 0.02 leaves a random 2-layer model's [SEG] state
    # nearly blind to the words (uniform attention over the prompt); a wider init makes it word-specific.
    init_std: float = 0.02
    # Std of the attention query/key projections (0: init_std). Narrow q/k under a wide init_std start
    # attention near uniform, so the [SEG] state begins as a bag of the prompt's words that the mask loss
    # sharpens; a wide q/k init saturates each head on one arbitrary token, where softmax has no gradient.
    qk_std: float = 0.0
    # LoRA on the LLM's attention/MLP projections (peft); the base weights are then frozen.
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16


@dataclass
class VisionConfig:
    image_size: int = 64
    # Channels of the conv stages; the last one is the mask decoder's width.
    channels: list[int] = field(default_factory=lambda: [32, 64])
    stem_channels: int = 16  # the full-resolution stem, also the decoder's finest high-res map
    # Image tokens the LLM sees per dense frame: an llm_grid x llm_grid pooled grid.
    llm_grid: int = 4


@dataclass
class DecoderConfig:
    depth: int = 2  # TwoWayTransformer layers
    heads: int = 4
    mlp_dim: int = 256
    memory_size: int = 4  # Mask Memory FIFO length (past frames), X2SAM's num_maskmem
    seg_tokens: int = 2  # sparse prompt tokens each [SEG] hidden state is projected to
    dense_hidden: int = 128  # hidden width of the per-pixel [SEG] dense prompt MLP


@dataclass
class SourceConfig:
    path: str = "???"  # an engine output dir (shards/ + index/)
    weight: float = 1.0


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    # Task mixing weights; a record only offers the tasks its annotations support.
    tasks: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 1.0))
    batch_size: int = 16
    video_batch_size: int = 4
    # Referring questions asked of one image or clip per batch (LISA's num_classes_per_sample); the rows
    # share the encoded frames and count towards the batch size.
    targets_per_record: int = 3
    num_workers: int = 0
    video_frames: int = 8  # frames decoded per video sample (sparse tokens for all of them)
    dense_frames: int = 1  # of those, frames whose full token grid goes to the LLM
    tokenizer_records: int = 500  # records scanned to build the word-level tokenizer of a tiny LLM
    max_text_tokens: int = 64


@dataclass
class LossConfig:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 2000
    min_lr_ratio: float = 0.05
    grad_accum: int = 1
    clip: float = 1.0
    max_seconds: float = 0.0  # wall-clock budget; > 0 stops there, the cosine schedule ending with it


@dataclass
class TrainConfig:
    out_dir: str = "out/train"
    seed: int = 0
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Parameter-name prefixes to train (vision, projector, llm, region, memory, decoder, seg_proj);
    # empty means all. freeze_vision is a shortcut for the usual "frozen encoder" setting.
    trainable: list[str] = field(default_factory=list)
    freeze_vision: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 2  # torch CPU threads
    log_every: int = 10
    ckpt_every: int = 500
    eval_samples: int = 200


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file + dotlist overrides -> a validated TrainConfig (unknown keys raise, naming the key)."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    unknown = set(cfg.data.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} in data.tasks; known: {TASKS}")
    for key in ("batch_size", "video_batch_size", "targets_per_record", "video_frames", "dense_frames"):
        if cfg.data[key] < 1:
            raise ValueError(f"data.{key} must be at least 1, got {cfg.data[key]}")
    return OmegaConf.to_object(cfg)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
