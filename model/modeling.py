"""An X2SAM-style segmentation MLLM: vision encoder -> projector -> causal LM -> [SEG] -> SAM2 mask decoder.

Data flow for a batch of B samples with T frames each (T = 1 for images):

    frames (F,T,3,S,S) -> VisionEncoder -> feats (B,T,C,h,w) + full- and half-resolution maps, per row
    (rows asking different questions of one image share its frames: `row_frames`)
    feats -> pooled tokens (dense frames: llm_grid^2 tokens, every frame: 1 sparse token) -> projector
    [visual prefix | text embeddings, `<region>` slots replaced by RegionEncoder(prompt map)] -> LLM
    LLM hidden state at each `[SEG]` -> seg_proj -> sparse prompt tokens of a SAM2 MaskDecoder; the first
    of them also makes the dense prompt (a per-pixel MLP over feature and [SEG], SegDensePrompt)
    per frame: MaskMemory attends to a FIFO bank of past frames' mask features, then the decoder
    predicts the mask, its upscaling sharpened by the encoder's high-res maps (SAM2's high-res path);
    the same [SEG] prompts every frame (One-Token-Seg-All, as in VideoLISA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Qwen2Config

from groundmill.model.config import TrainConfig

SEG, P_OPEN, P_CLOSE, REGION = "[SEG]", "<p>", "</p>", "<region>"
SPECIAL_TOKENS = [SEG, P_OPEN, P_CLOSE, REGION]
PROMPT_TYPES = ("point", "scribble", "box", "mask")
MAX_FRAMES = 64  # size of the learned frame-index table for sparse tokens
# Top-level module names, the vocabulary of `trainable` in the config.
PARTS = (
    "vision",
    "projector",
    "llm",
    "region",
    "seg_proj",
    "seg_dense",
    "memory",
    "prompt_encoder",
    "mask_decoder",
)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.GroupNorm(8, dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )
        self.norm = nn.GroupNorm(8, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(x + self.body(x)))


class VisionEncoder(nn.Module):
    """A small conv net: a full-resolution stem, stride 2 per channel stage, then two residual blocks
    (receptive field ~40 px). Returns the last stage and the two finest maps (full and half resolution),
    which feed the SAM2 decoder's high-resolution path, as SAM2's backbone FPN levels do."""

    def __init__(self, channels: list[int], stem: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1), nn.GroupNorm(8, stem), nn.GELU())
        stages: list[nn.Module] = []
        c_in = stem
        for c in channels:
            stages.append(
                nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.GELU())
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.blocks = nn.Sequential(ResBlock(c_in), ResBlock(c_in))

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(images.float() / 127.5 - 1.0)
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return self.blocks(x), maps[:2]


def sinusoid(x: Tensor, dim: int) -> Tensor:
    """Transformer-style sinusoidal encoding of scalars x (...,) -> (..., dim)."""
    freqs = torch.exp(torch.arange(dim // 2, device=x.device) * (-math.log(10000.0) / (dim // 2)))
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class MaskMemory(nn.Module):
    """X2SAM's Mask Memory: past frames' features fused with their predicted masks, kept in a FIFO bank;
    the current frame cross-attends to the bank, keys carrying a sinusoidal encoding of the frame gap."""

    def __init__(self, dim: int, heads: int, size: int):
        super().__init__()
        self.size = size
        self.mask_in = nn.Sequential(
            nn.Conv2d(1, dim // 4, 3, padding=1), nn.GELU(), nn.Conv2d(dim // 4, dim, 1)
        )
        self.gap_proj = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        # Pre-norm residuals with zero-init outputs: the memory starts as the identity, so what the
        # decoder learns on images holds on every video frame from the first video step.
        for layer in (self.attn.out_proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def encode(self, feats: Tensor, mask_logits: Tensor) -> Tensor:
        """(Q,C,h,w) features + (Q,1,H,W) mask logits -> (Q,C,h,w) memory entry."""
        prob = F.interpolate(mask_logits.detach().sigmoid(), size=feats.shape[-2:], mode="area")
        return feats + self.mask_in(prob)

    def forward(self, feats: Tensor, pe: Tensor, bank: list[tuple[Tensor, int]], t: int) -> Tensor:
        if not bank:
            return feats
        q, c, h, w = feats.shape
        pos = pe.flatten(2).transpose(1, 2)  # (1,hw,C)
        x = feats.flatten(2).transpose(1, 2)  # (Q,hw,C)
        gaps = torch.tensor([t - t_m for _, t_m in bank], device=feats.device)
        gap_enc = self.gap_proj(sinusoid(gaps, c))  # (M,C)
        mem = torch.cat(
            [m.flatten(2).transpose(1, 2) + pos + g for (m, _), g in zip(bank, gap_enc, strict=True)], 1
        )
        x = x + self.attn(self.norm1(x) + pos, mem, mem, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).reshape(q, c, h, w)


class SegDensePrompt(nn.Module):
    """The [SEG] state as a dense prompt: a per-pixel MLP on the feature whose hidden layer [SEG] scales
    and shifts (FiLM), its output added by the decoder to the image embedding. The nonlinearity after the
    modulation lets one pixel test a conjunction ("red" AND "circle") before any attention; zero-init
    output: starts as no prompt."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pixel = nn.Conv2d(dim, hidden, 1)
        self.query = nn.Linear(dim, 2 * hidden)
        self.out = nn.Conv2d(hidden, dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: Tensor, seg: Tensor) -> Tensor:
        """(Q,C,h,w) features, (Q,C) [SEG] prompt -> (Q,C,h,w) dense prompt."""
        scale, shift = self.query(seg)[..., None, None].chunk(2, dim=1)
        return self.out(F.gelu(self.pixel(feats) * (1 + scale) + shift))


class RegionEncoder(nn.Module):
    """Visual prompts (point, scribble, box, mask), rasterised to a map, pool the frame's features and the
    decoder's positional encoding into one LLM token (the `<region>` slot)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.type_emb = nn.Embedding(len(PROMPT_TYPES), hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, feats: Tensor, pe: Tensor, prompt_maps: Tensor, types: Tensor) -> Tensor:
        w = F.interpolate(prompt_maps[:, None].float(), size=feats.shape[-2:], mode="area")  # (R,1,h,w)
        w = w / w.sum((2, 3), keepdim=True).clamp_min(1e-6)
        pooled = torch.cat([(feats * w).sum((2, 3)), (pe * w).sum((2, 3))], dim=1)
        return self.mlp(pooled) + self.type_emb(types)


def build_llm(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """A random-init tiny Qwen2 for `tiny`, else the named hub id / local path, unchanged apart from
    the embedding rows added for the special tokens; LoRA through peft when configured."""
    c = cfg.llm
    if c.name == "tiny":
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_heads,
            intermediate_size=c.intermediate_size,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            initializer_range=c.init_std,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        llm = AutoModelForCausalLM.from_config(config)
        if c.qk_std > 0:
            for layer in llm.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    nn.init.normal_(proj.weight, std=c.qk_std)
    else:
        llm = AutoModelForCausalLM.from_pretrained(c.name)
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):
            llm.resize_token_embeddings(len(tokenizer))
    if c.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        llm = get_peft_model(llm, LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, target_modules=targets))
    return llm


class X2SamModel(nn.Module):
    def __init__(self, cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        v, d = cfg.vision, cfg.decoder
        dim = v.channels[-1]
        self.image_size = v.image_size
        self.grid = v.image_size // 2 ** len(v.channels)
        self.llm_grid = v.llm_grid
        self.dense_frames = cfg.data.dense_frames
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG)
        self.region_id = tokenizer.convert_tokens_to_ids(REGION)

        self.vision = VisionEncoder(v.channels, v.stem_channels)
        self.llm = build_llm(cfg, tokenizer)
        hidden = self.llm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.projector_pos = nn.Parameter(torch.zeros(v.llm_grid**2, hidden))  # where each dense token is
        self.projector_frame = nn.Parameter(torch.zeros(MAX_FRAMES, hidden))  # which frame a sparse token is
        nn.init.normal_(self.projector_pos, std=0.02)
        nn.init.normal_(self.projector_frame, std=0.02)
        self.region = RegionEncoder(dim, hidden)
        self.seg_tokens = d.seg_tokens
        self.seg_proj = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim * d.seg_tokens)
        )
        self.seg_dense = SegDensePrompt(dim, d.dense_hidden)
        self.memory = MaskMemory(dim, d.heads, d.memory_size)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(self.grid, self.grid),
            input_image_size=(v.image_size, v.image_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=d.depth, embedding_dim=dim, num_heads=d.heads, mlp_dim=d.mlp_dim
            ),
            num_multimask_outputs=0,  # one [SEG] -> one mask: no ambiguity heads, no matching needed
            iou_head_hidden_dim=dim,
            use_high_res_features=True,
        )
        # SAM2 projects its backbone's two finest FPN levels with these; ours have the encoder's widths.
        self.mask_decoder.conv_s0 = nn.Conv2d(v.stem_channels, dim // 8, 1)
        self.mask_decoder.conv_s1 = nn.Conv2d(v.channels[0], dim // 4, 1)

    # -- pieces -------------------------------------------------------------------------------------------

    def visual_tokens(self, feats: Tensor) -> Tensor:
        """(B,T,C,h,w) -> (B,P,hidden): llm_grid^2 tokens per dense frame, plus one sparse token per frame
        for videos (VideoLISA's sparse-dense sampling)."""
        b, t = feats.shape[:2]
        dense_idx = torch.linspace(0, t - 1, min(self.dense_frames, t)).round().long().unique()
        dense = F.adaptive_avg_pool2d(feats[:, dense_idx].flatten(0, 1), self.llm_grid)
        dense = self.projector(dense.flatten(2).transpose(1, 2)) + self.projector_pos  # (B*D,g*g,H)
        tokens = [dense.reshape(b, -1, dense.shape[-1])]
        if t > 1:
            sparse = self.projector(feats.mean((3, 4))) + self.projector_frame[:t]  # (B,T,H)
            tokens.append(sparse)
        return torch.cat(tokens, 1)

    def embed(self, batch: dict[str, Tensor], feats: Tensor) -> tuple[Tensor, Tensor, int]:
        """LLM input embeddings and attention mask: [visual prefix | text], `<region>` slots filled."""
        ids = batch["input_ids"]
        text = self.llm.get_input_embeddings()(ids)
        if "region_maps" in batch and len(batch["region_maps"]):
            r = batch["region_owner"]  # (R,2): sample, frame
            region = self.region(
                feats[r[:, 0], r[:, 1]], self.pe(), batch["region_maps"], batch["region_types"]
            )
            slots = (ids == self.region_id)[..., None]
            text = text.masked_scatter(slots, region.to(text.dtype))
        prefix = self.visual_tokens(feats).to(text.dtype)
        mask = torch.cat([batch["attention_mask"].new_ones(prefix.shape[:2]), batch["attention_mask"]], 1)
        return torch.cat([prefix, text], 1), mask, prefix.shape[1]

    def pe(self) -> Tensor:
        return self.prompt_encoder.get_dense_pe()

    def encode_frames(self, batch: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Each row's features (B,T,C,h,w) and the decoder's high-res maps, each (B,T,c,H,W), from the
        batch's (F,T,3,S,S) uint8 frames, encoded once however many rows share them (`row_frames`)."""
        frames = batch["frames"]
        f, t = frames.shape[:2]
        feats, high_res = self.vision(frames.flatten(0, 1))
        rows = batch.get("row_frames", torch.arange(f, device=frames.device))
        return feats.unflatten(0, (f, t))[rows], [m.unflatten(0, (f, t))[rows] for m in high_res]

    def decode(self, seg: Tensor, feats: Tensor, high_res: list[Tensor]) -> Tensor:
        """[SEG] prompt tokens (Q,n,C) and their samples' frames (Q,T,C,h,w) plus high-res maps ->
        mask logits (Q,T,S,S), frame by frame with the Mask Memory bank."""
        t = feats.shape[1]
        pe = self.pe()
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dec = self.mask_decoder
        bank: list[tuple[Tensor, int]] = []
        out = []
        for i in range(t):
            x = self.memory(feats[:, i], pe, bank, i)
            logits = dec(
                image_embeddings=x,
                image_pe=pe,
                sparse_prompt_embeddings=seg,
                dense_prompt_embeddings=no_mask + self.seg_dense(x, seg[:, 0]),  # the decoder adds it to x
                multimask_output=False,
                repeat_image=False,
                high_res_features=[dec.conv_s0(high_res[0][:, i]), dec.conv_s1(high_res[1][:, i])],
            )[0]
            if logits.shape[-1] != self.image_size:
                logits = F.interpolate(
                    logits, size=(self.image_size,) * 2, mode="bilinear", align_corners=False
                )
            out.append(logits[:, 0])
            if t > 1:
                bank = (bank + [(self.memory.encode(feats[:, i], logits), i)])[-self.memory.size :]
        return torch.stack(out, 1)

    # -- the whole model ----------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Teacher-forced pass: LM logits over the text positions and mask logits for every [SEG]."""
        feats, high_res = self.encode_frames(batch)
        embeds, mask, p = self.embed(batch, feats)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, p:]
        seg_pos = batch["input_ids"] == self.seg_id
        owner = seg_pos.nonzero()[:, 0]
        seg = self.seg_proj(hidden[seg_pos]).float().unflatten(-1, (self.seg_tokens, -1))
        masks = self.decode(seg, feats[owner].float(), [m[owner].float() for m in high_res])
        return {"logits": out.logits[:, p:], "mask_logits": masks}

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int, eos_id: int) -> Tensor:
        """Greedy continuation of `input_ids` (one sample, no padding); returns the full id sequence."""
        ids = batch["input_ids"]
        feats, _ = self.encode_frames(batch)
        for _ in range(max_new_tokens):
            embeds, mask, _ = self.embed(
                {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, feats
            )
            nxt = self.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if nxt.item() == eos_id:
                break
        return ids


def configure_trainable(model: X2SamModel, cfg: TrainConfig) -> None:
    """Freeze everything outside cfg.trainable (all parts if empty), and the encoder if freeze_vision.
    LoRA's own freezing of the LLM base weights is kept."""
    unknown = set(cfg.trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; known: {PARTS}")
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if cfg.trainable and part not in cfg.trainable or cfg.freeze_vision and part == "vision":
            p.requires_grad_(False)
        elif cfg.llm.lora and part == "llm":
            p.requires_grad_("lora_" in name)
