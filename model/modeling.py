"""X2SAM: SAM2's image encoder + a transformers VLM with [SEG] tokens -> SAM2's mask decoder.

Data flow for a batch of B rows with T frames each (T = 1 for images):

    frames (F,T,3,S,S) -> SAM2 Hiera + FPN (model/sam2_parts.py) -> embedding (B,T,C,S/16,S/16) and the
    S/4, S/8 levels for the decoder's high-res path, per row (rows asking different questions of one
    image share its frames: `row_frames`)
    the VLM (model/mllm.py) sees the dense frames through its own vision tower and processor, the
    question, and filled slots: `<region>` <- RegionEncoder(visual prompt over SAM2 features) and, for
    videos, one `<frame>` per sparse frame <- pooled SAM2 features + a sinusoidal frame index (VideoLISA's
    sparse-dense sampling, any clip length), and with mllm.sam2_token_grid the `<sam2>` slots <- each dense
    frame's pooled SAM2 embedding (X-SAM's segmentation projector, Sam2Projector)
    decoder.seg_head=sam2: VLM hidden state at each `[SEG]` -> seg_proj -> sparse prompt tokens of SAM2's MaskDecoder; the first
    of them also makes the dense prompt (a per-pixel MLP over feature and [SEG], SegDensePrompt);
    the conditioned pixels optionally attend to each other (decoder.relate_layers, PixelRelations), those
    of decoder.relate_frames frames spread over the clip at once (clip_windows); then per frame, in order:
    MaskMemory attends to a FIFO bank of past frames' mask features, the decoder predicts the mask, its
    upscaling sharpened by the S/4, S/8 maps (SAM2's high-res path),
    optionally plus the [SEG]-pixel dot product (decoder.seg_pixel, SegPixelLogits) and the word scores
    (decoder.word_pixel, WordPixelLogits: the [SEG] pools the input embeddings of the words before it, which
    score every pixel; the map also joins the conditioned pixels before the relations) and each word's
    weights over a pixel's place and optical flow (decoder.word_geometry, WordGeometry; decoder.flow,
    FrameFlow, adds the flow to the embedding first);
    the same [SEG] prompts every frame (One-Token-Seg-All, as in VideoLISA).
    decoder.seg_head=queries (X2SAM): the query head's N queries attend to the whole clip; each `[SEG]`
    scores them as a class embedding and the best query's masks are its masks (query_decode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ProcessorMixin

from groundmill.model.config import TrainConfig
from groundmill.model.generic import GenericHead
from groundmill.model.mllm import (
    FRAME,
    P_CLOSE,
    P_OPEN,
    REGION,
    SAM2,
    SEG,
    SPECIAL_TOKENS,
    build_mllm,
    configure_mllm_trainable,
)
from groundmill.model.sam2_parts import SamEncoder, sam2_state_dict, sam_heads

__all__ = ["FRAME", "P_CLOSE", "P_OPEN", "REGION", "SAM2", "SEG", "SPECIAL_TOKENS", "PromptSlots", "X2SamModel",
           "continued", "frame_picks"]  # fmt: skip
PROMPT_TYPES = ("point", "scribble", "box", "mask")
# Top-level module names, the vocabulary of `trainable` in the config.
PARTS = (
    "vision",
    "mllm",
    "region",
    "sparse",
    "sam2_proj",
    "seg_proj",
    "seg_dense",
    "seg_pixel",
    "word_pixel",
    "motion",
    "flow",
    "geometry",
    "relate",
    "memory",
    "prompt_encoder",
    "mask_decoder",
    "generic",
)


def frame_picks(t: int, n: int) -> list[int]:
    """n frame indices spread evenly over a clip of t frames (all of them when t <= n)."""
    return torch.linspace(0, t - 1, min(n, t)).round().long().unique().tolist()


@dataclass(frozen=True)
class PromptSlots:
    """What a row's prompt carries beside its words, for a clip of t frames: `dense` frames evenly spread
    that the VLM sees in full, one `<frame>` per sparse frame (videos only), and sam2_grid² `<sam2>` tokens
    per dense frame. The model fills the slots (`X2SamModel.run_mllm`); the collate writes them."""

    dense: int = 1
    sparse: int = 16
    sam2_grid: int = 0

    @classmethod
    def of(cls, cfg: TrainConfig) -> PromptSlots:
        return cls(cfg.data.dense_frames, cfg.data.sparse_frames, cfg.mllm.sam2_token_grid)

    def dense_picks(self, t: int) -> list[int]:
        return frame_picks(t, self.dense)

    def sparse_picks(self, t: int) -> list[int]:
        return frame_picks(t, self.sparse) if t > 1 else []

    def sam2_tokens(self, t: int) -> int:
        return len(self.dense_picks(t)) * self.sam2_grid**2


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


class PixelRelations(nn.Module):
    """Self-attention among a frame's [SEG]-conditioned pixels, with their positions in the values as well
    as the keys. SAM2's two-way transformer lets a pixel attend to the prompt tokens only, and keeps
    positions out of the values, so a pixel of one copy cannot compare where it lies with where the other
    copies lie ("the leftmost red circle"). Zero-init outputs: starts as the identity."""

    def __init__(self, dim: int, heads: int, layers: int, window: int = 1):
        super().__init__()
        self.window = window
        self.pos = nn.Conv2d(dim, dim, 1)
        self.time = nn.Linear(dim, dim)  # a frame's place in its window, beside its pixels' positions
        for proj in (self.pos, self.time):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 4, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.layers.layers:
            for out in (block.self_attn.out_proj, block.linear2):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        """(Q,T,C,h,w) conditioned embeddings of a clip, (1,C,h,w) positional encoding -> (Q,T,C,h,w).
        The pixels of `window` frames spread over the clip attend to each other at once, so a copy can also
        see where it lies in the other frames ("moving left"); window 1 relates each frame alone."""
        q, t, c, h, w = x.shape
        places = torch.arange(min(t, self.window), device=x.device)
        # Where a pixel lies and when, computed once for every window: (1,window,C,h,w).
        where = self.pos(pe)[:, None] + self.time(sinusoid(places, c))[:, :, None, None]
        out = torch.empty_like(x)
        for frames in clip_windows(t, self.window):
            clip = x[:, frames]
            tokens = (clip + where[:, : clip.shape[1]]).permute(0, 1, 3, 4, 2).flatten(1, 3)
            out[:, frames] = self.layers(tokens).unflatten(1, (clip.shape[1], h, w)).permute(0, 1, 4, 2, 3)
        return out


def window_stride(t: int, window: int) -> int:
    """The stride of a t-frame clip's windows: ceil(t / window)."""
    return -(-t // window)


def neighbour_frames(t: int, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each of t frames' previous and next frame at the stride of the clip's windows (clip_windows), the
    stride training clips have; the clip's ends are their own neighbours."""
    stride = window_stride(t, window)
    frames = torch.arange(t, device=device)
    return (frames - stride).clamp(min=0), (frames + stride).clamp(max=t - 1)


def clip_windows(t: int, window: int) -> list[slice]:
    """A clip of t frames as interleaved windows of at most `window` frames, each spanning the whole clip
    (frames k, k + n, k + 2n, ... for n = window_stride): a training clip samples `window` frames over its
    video, so a longer eval clip is seen at the same span and stride, and a net motion ("moving left") over
    the video is visible in every window, as in training."""
    n = window_stride(t, window)
    return [slice(k, None, n) for k in range(n)]


class FrameMotion(nn.Module):
    """Where a clip's features change between frames, as a feature (TDN's temporal difference, Wang et al.
    CVPR 2021): each frame's embedding gains a conv over its difference from the neighbouring frames, so a
    pixel carries which way its object moves (the edge it enters brightens, the one it leaves darkens),
    locally, before any attention. Two copies that look alike then differ in their pixels' features, and a
    motion word can score them like a colour word. Zero-init output; images and still clips pass unchanged."""

    def __init__(self, dim: int, hidden: int, window: int = 1):
        super().__init__()
        self.window = window
        # No biases: where nothing changes (a still clip) the feature is exactly zero.
        self.diff = nn.Sequential(
            nn.Conv2d(2 * dim, hidden, 3, padding=1, bias=False),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1, bias=False),
        )
        nn.init.zeros_(self.diff[-1].weight)

    def forward(self, feats: Tensor) -> Tensor:
        """(Q,T,C,h,w) -> (Q,T,C,h,w): each frame plus its motion feature (the clip's ends repeat themselves)."""
        t = feats.shape[1]
        if t == 1:
            return feats
        prev, next_ = neighbour_frames(t, self.window, feats.device)
        before, after = feats - feats[:, prev], feats[:, next_] - feats
        motion = self.diff(torch.cat([before, after], 2).flatten(0, 1)).unflatten(0, feats.shape[:2])
        return feats + motion


def lucas_kanade(frames: Tensor, grid: tuple[int, int], window: int, reg: float = 1e-2) -> Tensor:
    """(F,T,3,S,S) uint8 clips -> (F,T,2,h,w) optical flow, one (u, v) per cell of a grid of h x w cells:
    Lucas-Kanade (Lucas & Kanade, IJCAI 1981), the least-squares solve of brightness constancy
    (I_x u + I_y v + I_t = 0) over each cell, summed over the colour channels, with a ridge `reg` for flat
    cells. Frames are blurred to 4 x 4 pixels a cell first, so a shift of a few pixels stays within the
    linear range. Each frame is compared with its neighbours at the stride of the clip's windows
    (clip_windows), as FrameMotion compares features; a single frame has no flow."""
    f, t = frames.shape[:2]
    h, w = grid
    x = F.adaptive_avg_pool2d(frames.flatten(0, 1).float() / 255, (4 * h, 4 * w))
    x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False).unflatten(0, (f, t))
    prev, next_ = neighbour_frames(t, window, frames.device)
    gap = (next_ - prev).clamp(min=1).to(x.dtype)[:, None, None, None]
    it = (x[:, next_] - x[:, prev]) / gap
    iy, ix = torch.gradient((x[:, next_] + x[:, prev]) / 2, dim=(-2, -1))
    pairs = ((ix, ix), (ix, iy), (iy, iy), (ix, it), (iy, it))
    sums = torch.stack([(a * b).sum(2) for a, b in pairs], 2).flatten(0, 1)
    xx, xy, yy, xt, yt = F.adaptive_avg_pool2d(sums, grid).unflatten(0, (f, t)).unbind(2)
    xx, yy = xx + reg, yy + reg
    det = xx * yy - xy * xy
    return torch.stack([xy * yt - yy * xt, xy * xt - xx * yt], 2) / det[:, :, None]


class FrameFlow(nn.Module):
    """Optical flow as a feature of each frame's embedding (the flow stream of two-stream networks,
    Simonyan & Zisserman NeurIPS 2014, made cheap with lucas_kanade). The flow is normalised by the local
    contrast, so a red circle and a blue square moving alike get the same vector. No biases and a zero-init
    output: images and still clips pass exactly unchanged."""

    def __init__(self, dim: int, hidden: int, window: int = 1):
        super().__init__()
        self.window = window
        self.embed = nn.Sequential(
            nn.Conv2d(2, hidden, 1, bias=False), nn.GELU(), nn.Conv2d(hidden, dim, 1, bias=False)
        )
        nn.init.zeros_(self.embed[-1].weight)

    def forward(self, feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor | None]:
        """(F,T,C,h,w) embeddings of the (F,T,3,S,S) uint8 frames -> (F,T,C,h,w) plus their flow feature,
        and the (F,T,2,h,w) flow itself (None for images: no motion to score)."""
        if feats.shape[1] == 1:
            return feats, None
        # Squashed: a flat cell's ridge-damped noise and a fast object's large shift both stay in range.
        flow = torch.tanh(lucas_kanade(frames, feats.shape[-2:], self.window).to(feats.dtype))
        return feats + self.embed(flow.flatten(0, 1)).unflatten(0, feats.shape[:2]), flow


class WordGeometry(nn.Module):
    """Each word's learnt weights over a pixel's geometry: where it lies in the frame (x, y in [-1, 1]) and,
    with decoder.flow, which way it moves (its optical flow u, v). A [SEG]'s words, summed, score every
    pixel by them: "leftmost" leans the scores to the left, "moving left" to the pixels whose flow points
    left, the same for every colour and shape, so they hold for a pair never trained with them. Zero-init:
    starts as no score."""

    def __init__(self, word_dim: int):
        super().__init__()
        self.weights = nn.Linear(word_dim, 4, bias=False)
        nn.init.zeros_(self.weights.weight)

    def forward(self, text: tuple[Tensor, Tensor], size: tuple[int, int], flow: Tensor | None) -> Tensor:
        """Each [SEG]'s words (input embeddings (Q,L,H), which to read (Q,L)), the (h, w) grid, the (Q,T,2,h,w)
        flow of its clip or None -> (Q,T,h,w) scores (T = 1 without flow: the same on every frame)."""
        embeds, read = text
        weights = (self.weights(embeds) * read[..., None]).sum(1)  # (Q,4)
        ys, xs = (torch.linspace(-1, 1, n, device=embeds.device) for n in size)
        place = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2,h,w): x, y
        scores = torch.einsum("chw,qc->qhw", place, weights[:, :2])[:, None]
        if flow is not None:
            scores = scores + torch.einsum("qtchw,qc->qthw", flow, weights[:, 2:])
        return scores


class SegPixelLogits(nn.Module):
    """The [SEG] state as a per-pixel classifier: the dot product of a pixel embedding with a [SEG]
    embedding, at the embedding's stride, added to SAM2's mask logits. This is the mask readout of
    Mask2Former's queries (and X2SAM's query head) for one [SEG]. SAM2's decoder reads the words only
    through its prompt tokens, and trained from scratch it learnt colour but never shape. With this direct
    path, the share of a prediction on a same-coloured other shape fell from 0.29 to 0.02 in 2000 steps."""

    def __init__(self, dim: int):
        super().__init__()
        self.pixel = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.seg = nn.Linear(dim, dim)

    def forward(self, x: Tensor, seg: Tensor, size: tuple[int, int]) -> Tensor:
        """(Q,C,h,w) conditioned embedding, (Q,C) [SEG] prompt -> (Q,1,*size) logits."""
        dot = torch.einsum("qchw,qc->qhw", self.pixel(x), self.seg(seg))[:, None]
        return F.interpolate(dot, size=size, mode="bilinear", align_corners=False)


class WordPixelLogits(nn.Module):
    """Word-level grounding beside the [SEG] readout (LAVT's pixel-word attention, CRIS's word-pixel
    alignment): the [SEG] state attends over the words before it (keys: the VLM's contextual states, so it
    can tell the target's words from a landmark's), and the pooled *input embeddings* of those words score
    every pixel by a dot product. The pooled value is linear in the words, so a phrase's score is a
    weighted sum of its words' scores ("red" + "triangle"), which holds for a pair never trained on. The
    score map is added to the mask logits and, through a zero-init projection, to the conditioned pixels
    the relations compare."""

    def __init__(self, dim: int, hidden: int, heads: int):
        super().__init__()
        self.query = nn.Linear(hidden, dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=hidden, vdim=hidden, batch_first=True)
        self.pixel = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.inject = nn.Conv2d(1, dim, 1)
        nn.init.zeros_(self.inject.weight)
        nn.init.zeros_(self.inject.bias)

    def pool(self, seg: Tensor, states: Tensor, embeds: Tensor, words: Tensor) -> Tensor:
        """(Q,H) [SEG] states, (Q,L,H) contextual states and input embeddings of their rows, (Q,L) bool:
        the words each [SEG] may read -> (Q,C) pooled word vector."""
        words = words.clone()
        words[:, 0] |= ~words.any(1)  # a [SEG] with no word before it reads its row's first token, not NaN
        pooled = self.attn(
            self.query(seg)[:, None], states, embeds, key_padding_mask=~words, need_weights=False
        )
        return pooled[0][:, 0]

    def forward(self, feats: Tensor, words: Tensor) -> Tensor:
        """(Q,T,C,h,w) frames, (Q,C) pooled words -> (Q,T,h,w) word scores."""
        pixels = self.pixel(feats.flatten(0, 1)).unflatten(0, feats.shape[:2])
        return torch.einsum("qtchw,qc->qthw", pixels, words)


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


class Sam2Projector(nn.Module):
    """X-SAM's segmentation projector: a frame's SAM2 embedding and SAM2's positional encoding, pooled to
    grid x grid, -> grid² VLM tokens in row-major order (the `<sam2>` slots)."""

    def __init__(self, dim: int, hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, feats: Tensor, pe: Tensor) -> Tensor:
        """(N,C,h,w) features, (1,C,h,w) encoding -> (N*grid², hidden)."""
        f = F.adaptive_avg_pool2d(feats, self.grid)
        p = F.adaptive_avg_pool2d(pe, self.grid).expand(len(f), -1, -1, -1)
        return self.mlp(torch.cat([f, p], 1).flatten(2).transpose(1, 2)).flatten(0, 1)


class X2SamModel(nn.Module):
    def __init__(self, cfg: TrainConfig, processor: ProcessorMixin):
        super().__init__()
        v, d = cfg.vision, cfg.decoder
        tok = processor.tokenizer
        self.image_size = v.image_size
        self.slots = PromptSlots.of(cfg)
        self.seg_id, self.region_id, self.frame_id, self.sam2_id = tok.convert_tokens_to_ids(
            [SEG, REGION, FRAME, SAM2]
        )

        self.vision = SamEncoder(v)
        dim = self.vision.dim
        self.mllm = build_mllm(cfg.mllm, processor)
        hidden = self.mllm.config.get_text_config().hidden_size
        self.region = RegionEncoder(dim, hidden)
        self.sparse = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.sam2_proj = Sam2Projector(dim, hidden, self.slots.sam2_grid) if self.slots.sam2_grid else None
        # [SEG] -> seg_tokens prompt tokens, layer-normed: SAM2's decoder expects prompt tokens at the scale
        # of its own (unit-variance channels, like its N(0,1) point embeddings); the projection's default
        # init makes them 4x smaller, and the decoder then ignores the words for hundreds of steps.
        self.seg_proj = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim * d.seg_tokens),
            nn.Unflatten(-1, (d.seg_tokens, dim)), nn.LayerNorm(dim),
        )  # fmt: skip
        self.seg_dense = SegDensePrompt(dim, d.dense_hidden)
        heads = min(d.heads, dim // 8)
        self.seg_pixel = SegPixelLogits(dim) if d.seg_pixel else None
        self.word_pixel = WordPixelLogits(dim, hidden, heads) if d.word_pixel else None
        self.motion = FrameMotion(dim, d.dense_hidden, d.relate_frames) if d.motion else None
        self.relate = (
            PixelRelations(dim, heads, d.relate_layers, d.relate_frames) if d.relate_layers else None
        )
        self.memory = MaskMemory(dim, heads, d.memory_size)
        self.prompt_encoder, self.mask_decoder = sam_heads(dim, v, d)
        self.seg_head = d.seg_head
        if d.queries:
            self.generic = GenericHead(dim, hidden, d.queries, d.generic_layers, heads)
        # Built last, so turning it on leaves every other part's initial weights as they were.
        self.flow = FrameFlow(dim, d.dense_hidden, d.relate_frames) if d.flow else None
        self.geometry = WordGeometry(hidden) if d.word_geometry else None
        if v.checkpoint:
            self.load_sam2(v.checkpoint)
        self._slot_fill: tuple[torch.Size, dict[int, Tensor]] | None = None
        self.mllm.get_input_embeddings().register_forward_hook(self._fill_slots)

    def load_sam2(self, checkpoint: str) -> None:
        """SAM2's encoder, prompt encoder and mask decoder weights (every one of them must fit)."""
        missing, unexpected = self.load_state_dict(sam2_state_dict(checkpoint), strict=False)
        sam_parts = ("vision.", "prompt_encoder.", "mask_decoder.")
        missing = [k for k in missing if k.startswith(sam_parts)]
        if missing or unexpected:
            raise ValueError(
                f"sam2 checkpoint {checkpoint} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    # -- pieces -------------------------------------------------------------------------------------------

    def _fill_slots(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the VLM's input embeddings: `<region>` and `<frame>` slots take their features
        (set by `run_mllm` for the one call; any family's own image handling stays untouched)."""
        if self._slot_fill is None or args[0].shape != self._slot_fill[0]:
            return output
        out = output.clone()
        for token_id, values in self._slot_fill[1].items():
            out[args[0] == token_id] = values.to(out.dtype)
        return out

    def sparse_tokens(self, feats: Tensor) -> Tensor:
        """(B,T,C,h,w) -> (B*n,hidden): one pooled token per sparse frame, with its frame index."""
        picks = self.slots.sparse_picks(feats.shape[1])
        pooled = self.sparse(feats[:, picks].mean((3, 4)))  # (B,n,H)
        index = sinusoid(torch.tensor(picks, device=feats.device), pooled.shape[-1])
        return (pooled + index).flatten(0, 1)

    def run_mllm(self, batch: dict[str, Tensor], feats: Tensor) -> tuple[Tensor, Tensor]:
        """The VLM on the batch's text and images, slots filled: last hidden states and LM logits."""
        fills = {}
        if "region_maps" in batch and len(batch["region_maps"]):
            r = batch["region_owner"]  # (R,2): row, frame
            fills[self.region_id] = self.region(
                feats[r[:, 0], r[:, 1]], self.pe(), batch["region_maps"], batch["region_types"]
            )
        if feats.shape[1] > 1:
            fills[self.frame_id] = self.sparse_tokens(feats)
        if self.sam2_proj is not None:
            dense = feats[:, self.slots.dense_picks(feats.shape[1])]
            fills[self.sam2_id] = self.sam2_proj(dense.flatten(0, 1), self.pe())
        dtype = self.mllm.dtype
        inputs = {
            k[5:]: v.to(dtype) if v.is_floating_point() else v
            for k, v in batch.items()
            if k.startswith("mllm.")
        }
        self._slot_fill = (batch["input_ids"].shape, fills)
        try:
            out = self.mllm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True, **inputs)  # fmt: skip
        finally:
            self._slot_fill = None
        # float32 for the heads outside the VLM, also when it was loaded in bf16 (mllm.dtype) and runs
        # without autocast.
        return out.hidden_states[-1].float(), out.logits

    def pe(self) -> Tensor:
        return self.prompt_encoder.get_dense_pe()

    def encode_frames(self, batch: dict[str, Tensor]) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Each row's SAM2 embedding (B,T,C,h,w) and high-res maps, each (B,T,C,H,W), from the batch's
        (F,T,3,S,S) uint8 frames, encoded once however many rows share them (`row_frames`), without
        gradients when the encoder is frozen; with decoder.flow, the embedding carries the optical flow,
        also returned for clips (B,T,2,h,w)."""
        frames = batch["frames"]
        f, t = frames.shape[:2]
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats, high_res = self.vision(frames.flatten(0, 1))
        feats, flow = feats.unflatten(0, (f, t)), None
        if self.flow is not None:
            feats, flow = self.flow(feats, frames)
        rows = batch.get("row_frames", torch.arange(f, device=frames.device))
        return (
            feats[rows],
            [m.unflatten(0, (f, t))[rows] for m in high_res],
            None if flow is None else flow[rows],
        )

    def slot_ids(self) -> list[int]:
        """Token ids that stand for features, not words: `<region>`, `<frame>`, `<sam2>` and the VLM's own
        image / video placeholders."""
        config = self.mllm.config
        ids = [self.region_id, self.frame_id, self.sam2_id]
        return ids + [
            getattr(config, k)
            for k in ("image_token_id", "video_token_id")
            if getattr(config, k, None) is not None
        ]

    def seg_text(self, batch: dict[str, Tensor], seg_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Each [SEG]'s row as input embeddings (Q,L,H) and which of them are the words before it (Q,L):
        its text tokens, not slots, earlier [SEG]s, its answer or padding."""
        ids = batch["input_ids"]
        owner, where = seg_pos.nonzero().unbind(1)
        text = batch["attention_mask"].bool() & ~torch.isin(
            ids, torch.tensor(self.slot_ids() + [self.seg_id], device=ids.device)
        )
        before = torch.arange(ids.shape[1], device=ids.device)[None] < where[:, None]
        embeds = self.mllm.get_input_embeddings()(ids).float()
        return embeds[owner], text[owner] & before

    def word_scores(
        self, feats: Tensor, words: Tensor | None, text: tuple[Tensor, Tensor] | None, flow: Tensor | None
    ) -> Tensor | None:
        """Per-pixel scores of each [SEG]'s words (Q,T,h,w), added to its mask logits: the pooled words'
        (decoder.word_pixel) plus their weights over each pixel's place and flow (decoder.word_geometry);
        None with neither."""
        scores = [self.word_pixel(feats, words)] if words is not None else []
        if self.geometry is not None and text is not None:
            scores.append(self.geometry(text, feats.shape[-2:], flow).expand(-1, feats.shape[1], -1, -1))
        return sum(scores[1:], scores[0]) if scores else None

    def decode(
        self,
        seg: Tensor,
        feats: Tensor,
        high_res: list[Tensor],
        words: Tensor | None = None,
        text: tuple[Tensor, Tensor] | None = None,
        flow: Tensor | None = None,
    ) -> Tensor:
        """[SEG] prompt tokens (Q,n,C) and their rows' frames (Q,T,C,h,w) plus high-res maps (and with
        decoder.word_pixel each [SEG]'s pooled words (Q,C), with decoder.word_geometry its words (seg_text),
        with decoder.flow its frames' flow (Q,T,2,h,w)) -> mask logits (Q,T,S,S), frame by frame in order
        with the Mask Memory bank."""
        if self.motion is not None:
            feats = self.motion(feats)
        t = feats.shape[1]
        pe = self.pe()
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dec = self.mask_decoder
        bank: list[tuple[Tensor, int]] = []
        out = []
        # SAM2's decoder would add the dense prompt to the image embedding: the same sum, made here so the
        # relations see it. Then the Mask Memory, frame by frame in order.
        dense = torch.stack([self.seg_dense(feats[:, i], seg[:, 0]) for i in range(t)], 1)
        conditioned = feats + dense
        word_maps = self.word_scores(feats, words, text, flow)  # (Q,T,h,w)
        if word_maps is not None and words is not None:  # word_pixel's projection into the pixels
            conditioned = conditioned + self.word_pixel.inject(word_maps.flatten(0, 1)[:, None]).unflatten(
                0, (len(feats), t)
            )
        if self.relate is not None:
            conditioned = self.relate(conditioned, pe)
        for i in range(t):
            x = self.memory(conditioned[:, i], pe, bank, i)
            logits = dec(
                image_embeddings=x,
                image_pe=pe,
                sparse_prompt_embeddings=seg,
                dense_prompt_embeddings=no_mask,
                multimask_output=False,
                repeat_image=False,
                high_res_features=[dec.conv_s0(high_res[0][:, i]), dec.conv_s1(high_res[1][:, i])],
            )[0]
            if self.seg_pixel is not None:
                logits = logits + self.seg_pixel(x, seg[:, 0], logits.shape[-2:])
            if word_maps is not None:
                logits = logits + F.interpolate(
                    word_maps[:, i, None], size=logits.shape[-2:], mode="bilinear", align_corners=False
                )
            logits = F.interpolate(logits, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
            out.append(logits[:, 0])
            if t > 1:
                bank = (bank + [(self.memory.encode(feats[:, i], logits), i)])[-self.memory.size :]
        return torch.stack(out, 1)

    # -- the whole model ----------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Teacher-forced pass: LM logits over the sequence and mask logits for every [SEG]."""
        feats, high_res, flow = self.encode_frames(batch)
        hidden, logits = self.run_mllm(batch, feats)
        seg_pos = batch["input_ids"] == self.seg_id
        out = {"logits": logits}
        if "generic_rows" in batch:  # those rows' [SEG]s are class embeddings, not mask prompts
            rows = batch["generic_rows"]
            scored = self.query_decode(
                [hidden[r][seg_pos[r]] for r in rows.nonzero()[:, 0]],
                feats[rows, :1],
                high_res[0][rows, :1],
            )
            out["generic"] = [(c, m[:, 0]) for c, m in scored]
            seg_pos = seg_pos & ~rows[:, None]
        owner = seg_pos.nonzero()[:, 0]
        if not len(owner):  # only generic rows
            out["mask_logits"] = feats.new_zeros(0, feats.shape[1], self.image_size, self.image_size)
            return out
        if self.seg_head == "queries":
            out["seg_queries"] = self.query_decode(
                list(hidden[seg_pos][:, None]), feats[owner], high_res[0][owner]
            )
            out["mask_logits"] = self.selected_masks(out["seg_queries"])
            return out
        seg = self.seg_proj(hidden[seg_pos]).float()
        text = None if self.word_pixel is None and self.geometry is None else self.seg_text(batch, seg_pos)
        words = (
            None if self.word_pixel is None else self.word_pixel.pool(hidden[seg_pos], hidden[owner], *text)
        )
        out["mask_logits"] = self.decode(
            seg, feats[owner].float(), [m[owner].float() for m in high_res], words, text,
            None if flow is None else flow[owner].float(),
        )  # fmt: skip
        return out

    def query_decode(
        self, categories: list[Tensor], feats: Tensor, fine: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """X2SAM's query head over G clips: (G,T,C,h,w) frames, their (G,T,C,H,W) stride-4 maps and one
        (C_r,hidden) tensor of [SEG] states per clip, its categories -> per clip (N,C_r+1) class logits
        (the last: no object) and (N,T,H,W) mask logits of the N queries."""
        time = sinusoid(torch.arange(feats.shape[1], device=feats.device), feats.shape[2])
        return self.generic(feats.float(), self.pe(), time, fine.float(), categories)

    def selected_masks(self, scored: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Each [SEG]'s masks through its clip: those of the query most likely to be its object (one query
        for every frame, so the object keeps its identity), upsampled -> (Q,T,S,S)."""
        best = torch.stack([m[c.softmax(-1)[:, 0].argmax()] for c, m in scored])
        masks = F.interpolate(best, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return masks

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int, eos_id: int) -> Tensor:
        """Greedy continuation of `input_ids` (one row, no padding); returns the full id sequence. Slot
        tokens (image placeholders, `<region>`, `<frame>`, `<sam2>`) are never generated: the VLM would
        then look for features nobody gave it."""
        ids = batch["input_ids"]
        feats = self.encode_frames(batch)[0]
        slots = self.slot_ids()
        for _ in range(max_new_tokens):
            logits = self.run_mllm(continued(batch, ids), feats)[1][:, -1]
            logits[:, slots] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if nxt.item() == eos_id:
                break
        return ids


def continued(batch: dict[str, Tensor], ids: Tensor) -> dict[str, Tensor]:
    """The one-row, unpadded batch with its `input_ids` continued to `ids`. The processor's per-token
    inputs (the prompt's shape: Qwen-VL's mm_token_type_ids, from which its 3D rope positions come) mark the
    new tokens as text (0), as transformers' generate does."""
    prompt = batch["input_ids"]
    out = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for k, v in batch.items():
        if k.startswith("mllm.") and v.shape == prompt.shape:
            out[k] = torch.cat([v, v.new_zeros(len(v), ids.shape[1] - prompt.shape[1])], 1)
    return out


def configure_trainable(model: X2SamModel, cfg: TrainConfig) -> None:
    """Freeze everything outside cfg.trainable (all parts if empty), and the SAM2 encoder if
    freeze_vision; inside the VLM, LoRA / projector / embeddings as model/mllm.py decides."""
    unknown = set(cfg.trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; known: {PARTS}")
    configure_mllm_trainable(model.mllm, cfg.mllm)
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if cfg.trainable and part not in cfg.trainable or cfg.freeze_vision and part == "vision":
            p.requires_grad_(False)
        elif part != "mllm":
            p.requires_grad_(True)
