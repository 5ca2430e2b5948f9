"""The trainer's whole configuration: one dataclass tree, loaded from YAML with omegaconf.

Structured configs make omegaconf reject unknown keys by name (``Key 'lrr' not in 'OptimConfig'``), the
failure mode X2SAM users hit with 4,000-line configs. Overrides are ``key.sub=value`` dotlist strings.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Every task the data loader can make from a record (see model/tasks.py).
# "generic" needs the query head (decoder.queries > 0), so it is off unless weighted.
TASKS = ("referring", "semantic", "gcg", "interactive", "vgd", "generic", "video_referring", "video_object")


@dataclass
class MLLMConfig:
    # "tiny": a LLaVA (CLIP vision tower + Llama) built from_config from the fields below; anything else is
    # a local directory or hub id of an image-text-to-text model (Qwen2.5-VL, InternVL, SmolVLM, LLaVA...)
    # loaded with AutoModelForImageTextToText + AutoProcessor.
    name: str = "tiny"
    # tiny only: a causal LM whose config, weights and tokenizer become the language half (a directory,
    # a .gguf file, or "smollm2": the real SmolLM2-135M that installs offline); "" = a random Llama with
    # a word-level vocabulary built from the training records.
    language: str = ""
    dtype: str = "float32"  # weights' dtype when loading a pretrained model (bf16 autocast is separate)
    # The tiny vision tower (CLIPVisionModel) and its processor's input size.
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_image_size: int = 64
    vision_patch: int = 8
    # X-SAM's dual projectors: besides its own vision tower, the VLM sees each dense frame's SAM2 embedding
    # pooled to grid x grid tokens (with SAM2's positional encoding) through the segmentation projector,
    # so the [SEG] state can point at the features and positions the mask decoder reads; 0 = off.
    sam2_token_grid: int = 0
    # The tiny language model (random init when `language` is "").
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # Weight init std of the random tiny LLM. transformers' 0.02 leaves a random 2-layer model's [SEG]
    # state nearly blind to the words (uniform attention over the prompt); a wider init makes it
    # word-specific.
    init_std: float = 0.02
    # Std of the attention query/key projections (0: init_std). Narrow q/k under a wide init_std start
    # attention near uniform, so the [SEG] state begins as a bag of the prompt's words that the mask loss
    # sharpens; a wide q/k init saturates each head on one arbitrary token, where softmax has no gradient.
    qk_std: float = 0.0
    # LoRA (peft) on the language model's projections; its base weights are then frozen.
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # The VLM's own vision tower is frozen (X2SAM, Sa2VA); its projector is trained. Module-name
    # substrings that name the projector in each family: LLaVA / InternVL, Idefics3 / SmolVLM, Qwen-VL.
    freeze_vision_tower: bool = True
    projector_modules: list[str] = field(
        default_factory=lambda: ["multi_modal_projector", "connector", "merger"]
    )
    # Input embeddings and LM head trained in full (LISA), so the added special tokens learn.
    train_embeddings: bool = True
    gradient_checkpointing: bool = False


@dataclass
class VisionConfig:
    # SAM2's image encoder from one of sam2's hydra configs, with hydra overrides (a tiny Hiera).
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    overrides: list[str] = field(default_factory=list)
    # A sam2 checkpoint (.pt with a "model" state dict, or .safetensors) or a hub id such as
    # facebook/sam2.1-hiera-large; "" = random init. Its prompt encoder and mask decoder load too.
    checkpoint: str = ""
    image_size: int = 1024  # SAM2's input size; the embedding is image_size / 16 square


@dataclass
class DecoderConfig:
    # SAM2's mask decoder (defaults: SAM2's own, so its checkpoint loads).
    depth: int = 2  # TwoWayTransformer layers
    heads: int = 8
    mlp_dim: int = 2048
    iou_hidden: int = 256
    memory_size: int = 4  # Mask Memory FIFO length (past frames), X2SAM's num_maskmem
    seg_tokens: int = 2  # sparse prompt tokens each [SEG] hidden state is projected to
    dense_hidden: int = 128  # hidden width of the per-pixel [SEG] dense prompt MLP
    # Self-attention layers among a frame's [SEG]-conditioned pixels, positions in the values, before
    # SAM2's decoder (PixelRelations: lets a copy compare where it lies with the others); 0 = off.
    relate_layers: int = 0
    # Frames whose pixels relate at once (a space-time window: motion, "moving left"); 1 = each frame
    # alone. A longer clip is related in interleaved windows that each span it, as training clips do.
    relate_frames: int = 1
    # Add the [SEG]-pixel dot product to SAM2's mask logits (SegPixelLogits): a direct path from the
    # words to every pixel; off keeps SAM2's decoder as it is.
    seg_pixel: bool = False
    # Word-level grounding beside the [SEG] readout (WordPixelLogits): the [SEG] attends over the words
    # before it, and their pooled input embeddings score every pixel, so a phrase scores as the sum of its
    # words; off: the words reach the pixels through the [SEG] state alone.
    word_pixel: bool = False
    # Each video frame's embedding gains a feature of how it differs from its neighbours (FrameMotion): which
    # way a pixel's object moves, before any attention ("moving left"); images are unchanged.
    motion: bool = False
    # Each video frame's embedding gains its optical flow (FrameFlow: Lucas-Kanade per embedding cell,
    # normalised by contrast), so a motion word scores a pair's pixels whatever its colours; images unchanged.
    flow: bool = False
    # Each word's learnt weights over a pixel's place (x, y) and, with flow, its flow (WordGeometry): "leftmost"
    # and "moving left" score every pair alike; off: those words reach the pixels through [SEG] alone.
    word_geometry: bool = False
    # X2SAM's generic / open-vocabulary head: N mask queries classified against the category [SEG]s
    # (model/generic.py); 0 = off (one [SEG] -> one mask only).
    queries: int = 0
    generic_layers: int = 2
    # What turns a referring / GCG [SEG] into its mask. "sam2": SAM2's mask decoder prompted by the [SEG]
    # (Sa2VA, VideoLISA), frame by frame with the Mask Memory. "queries": X2SAM's way, the query head above
    # (needs queries > 0): the [SEG] is the class embedding and the query that scores highest against it
    # gives the mask on every frame of the clip; trained by mask-only Hungarian matching with cls + BCE +
    # Dice and a listwise rank loss over the queries (model/losses.py: generic_loss, referring=True).
    seg_head: str = "sam2"


@dataclass
class SourceConfig:
    path: str = "???"  # an engine output dir (shards/ + index/)
    weight: float = 1.0


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    # Task mixing weights; a record only offers the tasks its annotations support.
    tasks: dict[str, float] = field(default_factory=lambda: {**dict.fromkeys(TASKS, 1.0), "generic": 0.0})
    batch_size: int = 16
    video_batch_size: int = 4
    # Referring questions asked of one image or clip per batch (LISA's num_classes_per_sample); the rows
    # share the encoded frames and count towards the batch size.
    targets_per_record: int = 3
    # Share of semantic records asked in greyscale (torchvision's RandomGrayscale), of the labels that name
    # none of the record's attributes only ("circle", not "red circle"): a class then has to be seen
    # without its colour, so the colours it was trained with do not become part of it. 0 = off.
    semantic_grayscale: float = 0.0
    # Of those attribute-free records, that share is asked with every hue turned at random (torchvision's
    # ColorJitter hue) instead of in greyscale: a class also seen in colours it was never trained with.
    semantic_hue: float = 0.0
    # Semantic rows also ask an object's attributes alone ("red" -> every red object, whatever its class):
    # an attribute then has to be seen apart from the classes it was trained with.
    semantic_attributes: bool = False
    num_workers: int = 0
    video_frames: int = 8  # frames sampled per training clip (the decoder predicts a mask on each)
    # VideoLISA's sparse-dense sampling, at any clip length: dense frames go through the VLM's vision
    # tower in full, sparse frames become one pooled token each; both spread evenly over the clip.
    dense_frames: int = 1
    sparse_frames: int = 16
    tokenizer_records: int = 500  # records, spread over the shards, that make a tiny LLM's word vocabulary
    max_text_tokens: int = 64  # generation length (GCG captions)


@dataclass
class LossConfig:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    cls: float = 2.0  # generic head: Mask2Former's class weight...
    no_object: float = 0.1  # ...and its "no object" class weight


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
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Top-level parts to train (modeling.PARTS); empty means all. The SAM2 encoder is frozen by default.
    trainable: list[str] = field(default_factory=list)
    freeze_vision: bool = True
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 autocast on GPU, fp32 on CPU; bf16: autocast on any device; fp32: never.
    precision: str = "auto"
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
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.decoder.seg_head not in ("sam2", "queries"):
        raise ValueError(f"decoder.seg_head must be sam2 or queries, got {cfg.decoder.seg_head!r}")
    for key, wanted in (("data.tasks.generic", cfg.data.tasks.get("generic", 0) > 0),
                        ("decoder.seg_head=queries", cfg.decoder.seg_head == "queries")):  # fmt: skip
        if wanted and cfg.decoder.queries < 1:
            raise ValueError(f"{key} needs the query head: set decoder.queries (e.g. 16)")
    unknown = set(cfg.data.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} in data.tasks; known: {TASKS}")
    if cfg.decoder.relate_frames < 1:
        raise ValueError(f"decoder.relate_frames must be at least 1, got {cfg.decoder.relate_frames}")
    for key in ("semantic_grayscale", "semantic_hue"):
        if not 0 <= getattr(cfg.data, key) <= 1:
            raise ValueError(f"data.{key} must be a share between 0 and 1, got {getattr(cfg.data, key)}")
    for key in (
        "batch_size",
        "video_batch_size",
        "targets_per_record",
        "video_frames",
        "dense_frames",
        "sparse_frames",
    ):
        if cfg.data[key] < 1:
            raise ValueError(f"data.{key} must be at least 1, got {cfg.data[key]}")
    return OmegaConf.to_object(cfg)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
