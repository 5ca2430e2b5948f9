"""Short captions: several captions per image from an image-captioning model (GranD: BLIP-2, LLaVA).

The stage talks to a `Captioner` (a batch of images -> n captions each), picked by `params.backend`:

- `transformers`: an image-to-text model in-process: hub ids and local paths load the checkpoint's own
  classes (`AutoModelForImageTextToText` + `AutoProcessor`: BLIP, BLIP-2 as in GranD, ...); `tiny` is
  `BlipForConditionalGeneration` from a small config with random weights, whose captions are word
  salad (the run record flags it).
- `http`: a vision-language model behind an OpenAI-compatible chat endpoint (`vllm serve`, SGLang,
  hosted APIs) through the shared HTTP LLM client (`stages/llm/http.py`: bounded concurrency, timeouts,
  transport retries). Each request carries `params.instruction` and the image as a base64 JPEG
  `image_url` content part; `model.id` is the served model's name and `params.llm` says where the
  server is. Each of the n captions is its own request with its own seed, so a sampling server gives
  varied captions. A caption is the generation's first complete sentence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from PIL import Image

from groundmill.schema import Caption
from groundmill.stages.base import ModelSpec, Resources, Sample, SampleError, Stage
from groundmill.stages.llm import FINISH_ERROR, Generation, LLMConfig, Message, SamplingParams
from groundmill.stages.llm.http import OpenAIHTTPBackend, image_part
from groundmill.stages.llm.parsing import parse_prose
from groundmill.stages.models import device_for, dtype_for, local_path, seeded
from groundmill.stages.tokenizers import bert_wordpiece_tokenizer

TINY_IMAGE_SIZE = 128


class Captioner(Protocol):
    def caption(self, images: list[Image.Image], num_captions: int, seeds: list[int]) -> list[list[str]]:
        """Up to `num_captions` captions per image; `seeds` (one per image) make sampling reproducible."""
        ...

    def close(self) -> None:
        """Release clients and connections."""
        ...


@dataclass
class GenerationParams:
    max_new_tokens: int = 24
    num_beams: int = 1  # > 1 with sample=False: beam search returning the best num_captions beams
    sample: bool = True  # nucleus sampling gives varied captions
    top_p: float = 0.9
    temperature: float = 1.0
    prompt: str = ""  # transformers only: a caption prefix (BLIP conditional captioning), e.g. "a photo of"


class BlipCaptioner:
    def __init__(self, spec: ModelSpec, resources: Resources, seed: int, params: ShortCaptions.Params):
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
        else:  # the checkpoint's own classes: BLIP, BLIP-2 (OPT or Flan-T5), ...
            from transformers import AutoModelForImageTextToText, AutoProcessor

            source = local_path(spec) or spec.id
            model = AutoModelForImageTextToText.from_pretrained(source, revision=spec.revision)
            self.processor = AutoProcessor.from_pretrained(source, revision=spec.revision)
        self.model = model.to(self.device, self.dtype).eval()
        self.gen = params.generation

    def caption(self, images: list[Image.Image], num_captions: int, seeds: list[int]) -> list[list[str]]:
        return [self._caption(im, num_captions, seed) for im, seed in zip(images, seeds, strict=True)]

    @torch.inference_mode()
    def _caption(self, image: Image.Image, num_captions: int, seed: int) -> list[str]:
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

    def close(self) -> None:
        """The model is freed with the actor; nothing else to release."""


class ChatCaptioner:
    """Captions from an OpenAI-compatible chat endpoint serving a vision-language model."""

    def __init__(self, spec: ModelSpec, resources: Resources, seed: int, params: ShortCaptions.Params):
        if params.llm.backend != "http":
            raise ValueError(
                f"params.llm.backend: the http captioner needs 'http', not {params.llm.backend!r}"
            )
        if not params.instruction.strip():
            raise ValueError(
                "params.instruction: the http captioner needs an instruction to send with the image"
            )
        self.backend = OpenAIHTTPBackend(params.llm, spec.id)
        self.backend.setup()
        self.instruction = params.instruction
        g = params.generation
        self.sampling = SamplingParams(g.max_new_tokens, g.temperature if g.sample else 0.0, g.top_p)

    def close(self) -> None:
        self.backend.close()

    def messages(self, image: Image.Image) -> list[Message]:
        content = [image_part(image), {"type": "text", "text": self.instruction}]
        return [{"role": "user", "content": content}]

    def caption(self, images: list[Image.Image], num_captions: int, seeds: list[int]) -> list[list[str]]:
        # every request of the batch in flight at once (bounded by llm.max_concurrency)
        jobs = [
            (self.messages(image), replace(self.sampling, seed=seed + k))
            for image, seed in zip(images, seeds, strict=True)
            for k in range(num_captions)
        ]
        gens = self.backend.generate_each(jobs)
        captions = []
        for i in range(len(images)):
            mine = gens[i * num_captions : (i + 1) * num_captions]
            if mine and all(g.finish_reason == FINISH_ERROR for g in mine):
                raise SampleError(f"caption requests failed: {mine[-1].error}")
            captions.append([text for g in mine if (text := first_sentence(g))])
        return captions


def first_sentence(gen: Generation) -> str:
    """A generation's first complete sentence ('' when it failed or has none)."""
    try:
        return parse_prose(gen, 1, 1, accept_truncated=True)
    except ValueError:
        return ""


CAPTIONERS: dict[str, Callable[[ModelSpec, Resources, int, ShortCaptions.Params], Captioner]] = {
    "transformers": BlipCaptioner,
    "http": ChatCaptioner,
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
        # http: where the server is (base_url, timeout, concurrency, retries) and what to ask
        llm: LLMConfig = field(default_factory=lambda: LLMConfig(backend="http"))
        instruction: str = "Write a short caption of this image in one sentence."

    def setup(self) -> None:
        if self.params.backend not in CAPTIONERS:
            raise ValueError(f"params.backend: {self.params.backend!r} is not one of {sorted(CAPTIONERS)}")
        factory = CAPTIONERS[self.params.backend]
        self.captioner = factory(self.model_spec, self.resources, self.seed, self.params)

    def teardown(self) -> None:
        self.captioner.close()

    def process(self, samples: list[Sample]) -> None:
        n = self.params.num_captions
        views = [(s, i, v) for s in samples for i, v in enumerate(s.views())]
        seeds = [image_seed(self.seed, s.key, i) for s, i, _ in views]
        texts = self.captioner.caption([v.image for _, _, v in views], n, seeds)
        for (_, _, view), image_texts in zip(views, texts, strict=True):
            view.record["captions"] = [
                Caption(text=t, model=self.model_spec.id) for t in unique_captions(image_texts, n)
            ]

    def provenance(self) -> dict[str, Any]:
        p, g = self.params, self.params.generation
        info = super().provenance() | {"backend": p.backend, "sample": g.sample}
        if p.backend == "http":
            return info | {"base_url": p.llm.base_url, "instruction": p.instruction}
        return info | {"prompt": g.prompt}
