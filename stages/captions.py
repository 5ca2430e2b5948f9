"""Short captions: several captions per image from an image-captioning model (GranD: BLIP-2, LLaVA).

The stage talks to a `Captioner` (images -> n captions each). `transformers` is BLIP through
transformers (`BlipForConditionalGeneration`; hub ids and local paths load unchanged; `tiny` is the
same class from a small config with random weights, whose captions are word salad; the run record
flags it). Backends built on the shared LLM clients (`stages/llm/`, vision-language chat) plug in by
adding an entry to `CAPTIONERS`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from groundmill.pipeline.config import ModelSpec, Resources
from groundmill.schema import Caption
from groundmill.stages.base import Sample, Stage
from groundmill.stages.models import device_for, dtype_for, local_path, seeded
from groundmill.stages.tokenizers import bert_wordpiece_tokenizer

TINY_IMAGE_SIZE = 128


class Captioner(Protocol):
    def caption(self, image: Image.Image, num_captions: int, seed: int) -> list[str]: ...


@dataclass
class GenerationParams:
    max_new_tokens: int = 24
    num_beams: int = 1  # > 1 with sample=False: beam search returning the best num_captions beams
    sample: bool = True  # nucleus sampling gives varied captions
    top_p: float = 0.9
    temperature: float = 1.0
    prompt: str = ""  # optional caption prefix (BLIP conditional captioning), e.g. "a picture of"


class BlipCaptioner:
    def __init__(self, spec: ModelSpec, resources: Resources, seed: int, gen: GenerationParams):
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

        self.device = device_for(spec, resources)
        self.dtype = dtype_for(spec, self.device)
        if spec.is_random:
            tokenizer = bert_wordpiece_tokenizer()
            seeded(seed, "blip")
            encoder = {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            }
            special = {  # tiny BLIP decodes from [CLS] (real BLIP adds a [DEC] token)
                "bos_token_id": tokenizer.cls_token_id,
                "eos_token_id": tokenizer.sep_token_id,
                "sep_token_id": tokenizer.sep_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            config = BlipConfig(
                text_config=encoder
                | special
                | {"vocab_size": tokenizer.vocab_size, "encoder_hidden_size": 32},
                vision_config=encoder | {"image_size": TINY_IMAGE_SIZE, "patch_size": 16},
                projection_dim=32,
            )
            model = BlipForConditionalGeneration(config)
            size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
            self.processor = BlipProcessor(image_processor=BlipImageProcessor(size=size), tokenizer=tokenizer)
        else:
            source = local_path(spec) or spec.id
            model = BlipForConditionalGeneration.from_pretrained(source, revision=spec.revision)
            self.processor = BlipProcessor.from_pretrained(source, revision=spec.revision)
        self.model = model.to(self.device, self.dtype).eval()
        self.gen = gen

    @torch.inference_mode()
    def caption(self, image: Image.Image, num_captions: int, seed: int) -> list[str]:
        g = self.gen
        inputs = self.processor(images=[image], text=[g.prompt] if g.prompt else None, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        torch.manual_seed(seed)  # sampling is reproducible per image, whatever the batch it came in
        options: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "num_return_sequences": num_captions}
        if g.sample:
            options |= {"do_sample": True, "top_p": g.top_p, "temperature": g.temperature}
        else:
            options |= {"do_sample": False, "num_beams": max(g.num_beams, num_captions)}
        ids = self.model.generate(**inputs, **options)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


CAPTIONERS: dict[str, Callable[[ModelSpec, Resources, int, GenerationParams], Captioner]] = {
    "transformers": BlipCaptioner,
}


def image_seed(seed: int, key: str, view_index: int) -> int:
    """A per-image sampling seed from the run seed and the sample key (stable across runs and batching)."""
    digest = hashlib.sha256(f"{seed}:{key}:{view_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def unique_captions(texts: list[str], limit: int) -> list[str]:
    """Non-empty captions, first occurrence kept, at most `limit`."""
    return [t for t in dict.fromkeys(t.strip() for t in texts) if t][:limit]


class ShortCaptions(Stage):
    name = "captions"
    provides = ("captions",)

    @dataclass
    class Params:
        backend: str = "transformers"  # a key of CAPTIONERS
        num_captions: int = 3
        generation: GenerationParams = field(default_factory=GenerationParams)

    def setup(self) -> None:
        if self.params.backend not in CAPTIONERS:
            raise ValueError(f"params.backend: {self.params.backend!r} is not one of {sorted(CAPTIONERS)}")
        factory = CAPTIONERS[self.params.backend]
        self.captioner = factory(self.model_spec, self.resources, self.seed, self.params.generation)

    def process(self, samples: list[Sample]) -> None:
        n = self.params.num_captions
        for sample in samples:
            for i, view in enumerate(sample.views()):
                texts = self.captioner.caption(view.image, n, image_seed(self.seed, sample.key, i))
                view.record["captions"] = [
                    Caption(text=t, model=self.model_spec.id) for t in unique_captions(texts, n)
                ]

    def provenance(self) -> dict[str, Any]:
        g = self.params.generation
        return super().provenance() | {"backend": self.params.backend, "prompt": g.prompt, "sample": g.sample}
