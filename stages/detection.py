"""Detection through transformers: OWLv2 and Grounding DINO (open vocabulary, queried with the image's
tags plus configured classes) and Mask2Former (a closed-vocabulary universal segmentation model, e.g.
COCO-panoptic, whose detections carry their own masks, as GranD's EVA-02 instance masks did).

One stage class, one detector per manifest entry (`params.detector`), so each detector has its own
model id, resources and actor pool; each writes its filtered boxes to `record["detections"][stage]`
and the `voting` stage merges them. Per-model score threshold and NMS follow GranD (score >= 0.1,
IoU 0.9 by default).

`tiny` builds the same model classes from small configs with random weights and real offline
tokenizers (see `stages.tokenizers`): CLIP BPE for OWLv2, bert-base-uncased WordPiece for
Grounding DINO. Hub ids and local paths load the model and its processor with `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from groundmill.media import pad_to_aspect
from groundmill.schema import encode_mask
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.boxes import Detection, decode_boxes, filter_detections
from groundmill.stages.models import device_for, dtype_for, local_path, seeded
from groundmill.stages.tagging import load_vocabulary
from groundmill.stages.tokenizers import bert_wordpiece_tokenizer, clip_bpe_tokenizer

TINY_IMAGE_SIZE = 224


def detection_queries(
    tags: list[dict[str, Any]], classes: list[str], use_tags: bool, max_queries: int
) -> list[str]:
    """Tag labels (best first) then configured classes, deduplicated, at most `max_queries`."""
    words = [t["label"] for t in tags] if use_tags else []
    return list(dict.fromkeys(w.strip().lower() for w in words + classes if w.strip()))[:max_queries]


def grounding_prompt(queries: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's text prompt (`"cat. dog."`) and each query's character span in it."""
    spans, parts, pos = [], [], 0
    for q in queries:
        spans.append((pos, pos + len(q)))
        parts.append(q + ".")
        pos += len(q) + 2  # the query, its full stop and the separating space
    return " ".join(parts), spans


def query_token_scores(
    token_probs: np.ndarray, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> np.ndarray:
    """(N, T) per-token probabilities -> (N, Q) per-query scores: the best token inside each query's span."""
    scores = np.zeros((token_probs.shape[0], len(spans)), dtype=np.float64)
    for q, (qs, qe) in enumerate(spans):
        tokens = [
            t for t, (s, e) in enumerate(offsets[: token_probs.shape[1]]) if e > s and s >= qs and e <= qe
        ]
        if tokens:
            scores[:, q] = token_probs[:, tokens].max(axis=1)
    return scores


class _Detector:
    """A transformers detector and its processor: pretrained (hub id or local path) or `tiny`."""

    model_class: str  # transformers class names, imported on use
    processor_class: str
    open_vocabulary = True  # False: the model has its own label set and takes no queries

    def __init__(self, spec: Any, device: torch.device, dtype: torch.dtype, seed: int):
        import transformers

        if spec.is_random:
            seeded(seed, self.model_class)
            self.model, self.processor = self.tiny()
        else:
            source = local_path(spec) or spec.id
            model_cls = getattr(transformers, self.model_class)
            self.model = model_cls.from_pretrained(source, revision=spec.revision)
            processor_cls = getattr(transformers, self.processor_class)
            self.processor = processor_cls.from_pretrained(source, revision=spec.revision)
        self.model = self.model.to(device, dtype).eval()
        self.device, self.dtype = device, dtype

    @staticmethod
    def tiny() -> tuple[Any, Any]:
        """The same model class from a small config (random weights) and a real offline processor."""
        raise NotImplementedError

    def inputs(self, **kwargs: Any) -> Any:
        inputs = self.processor(return_tensors="pt", **kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


class _Owlv2(_Detector):
    """OWLv2: one query set per image; boxes are relative to the image padded to a square."""

    model_class, processor_class = "Owlv2ForObjectDetection", "Owlv2Processor"

    @staticmethod
    def tiny() -> tuple[Any, Any]:
        from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

        tokenizer = clip_bpe_tokenizer()
        text = {"vocab_size": len(tokenizer), "max_position_embeddings": 16}
        text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = Owlv2Config(
            text_config=text | _tiny_encoder() | {"pad_token_id": tokenizer.pad_token_id},
            vision_config=_tiny_encoder() | {"image_size": TINY_IMAGE_SIZE, "patch_size": 16},
            projection_dim=32,
        )
        size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size=size), tokenizer=tokenizer)
        return Owlv2ForObjectDetection(config), processor

    @torch.inference_mode()
    def detect(self, image: Image.Image, queries: list[str], template: str) -> list[Detection]:
        text = [[template.format(q) for q in queries]]
        inputs = self.inputs(text=text, images=[image], padding="max_length", truncation=True, max_length=16)
        out = self.model(**inputs)
        probs = out.logits[0].float().sigmoid().cpu().numpy()  # (patches, queries)
        side = max(image.size)
        return decode_boxes(out.pred_boxes[0].float().cpu().numpy(), probs, queries, (side, side), image.size)


MIN_FEATURE_SIDE = 64  # pixels the short side needs at the model's input: two cells at stride 32


class _GroundingDino(_Detector):
    """Grounding DINO: queries joined into one prompt; a box's query is its best-scoring query token.
    The query template is OWL's sentence form and is not used: Grounding DINO takes bare words."""

    model_class, processor_class = "GroundingDinoForObjectDetection", "GroundingDinoProcessor"

    @staticmethod
    def tiny() -> tuple[Any, Any]:
        from transformers import (
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
        )

        tokenizer = bert_wordpiece_tokenizer()
        config = GroundingDinoConfig(
            backbone_config=_tiny_swin(["stage2", "stage3", "stage4"]),
            text_config={"model_type": "bert", "vocab_size": tokenizer.vocab_size} | _tiny_encoder(),
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,  # transformers' Grounding DINO needs at least two
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_queries=50,
            num_feature_levels=3,
            encoder_n_points=2,
            decoder_n_points=2,
            max_text_len=64,
        )
        size = {"shortest_edge": TINY_IMAGE_SIZE, "longest_edge": TINY_IMAGE_SIZE * 4 // 3}
        processor = GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessor(size=size), tokenizer=tokenizer
        )
        return GroundingDinoForObjectDetection(config), processor

    @torch.inference_mode()
    def detect(self, image: Image.Image, queries: list[str], template: str) -> list[Detection]:
        prompt, spans = grounding_prompt(queries)
        max_len = self.model.config.max_text_len
        offsets = self.processor.tokenizer(
            prompt, return_offsets_mapping=True, truncation=True, max_length=max_len
        )
        # The processor fits the long side into `longest_edge`: an extreme aspect ratio would leave the
        # short side below the backbone's stride, so such pictures are padded (boxes clip back).
        padded = pad_to_aspect(image, self.processor.image_processor.size["longest_edge"] / MIN_FEATURE_SIDE)
        out = self.model(**self.inputs(images=[padded], text=[prompt], truncation=True, max_length=max_len))
        token_probs = out.logits[0].float().sigmoid().cpu().numpy()  # (boxes, max_text_len)
        scores = query_token_scores(token_probs, offsets["offset_mapping"], spans)
        return decode_boxes(out.pred_boxes[0].float().cpu().numpy(), scores, queries, padded.size, image.size)


class _Mask2Former(_Detector):
    """Mask2Former: closed vocabulary (the checkpoint's `id2label`, e.g. COCO-panoptic's 133 classes).
    Each kept query becomes a detection with its own binary mask (instance post-processing, so
    overlapping instances keep whole masks); its box is the mask's tight box. The queries and the
    template are not used."""

    model_class, processor_class = "Mask2FormerForUniversalSegmentation", "AutoImageProcessor"
    open_vocabulary = False

    @staticmethod
    def tiny() -> tuple[Any, Any]:
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        labels = COCO_PANOPTIC_LABELS
        return Mask2FormerForUniversalSegmentation(
            tiny_mask2former_config(labels)
        ), Mask2FormerImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE // 2, "longest_edge": TINY_IMAGE_SIZE}, size_divisor=32
        )

    @torch.inference_mode()
    def detect(self, image: Image.Image, queries: list[str], template: str) -> list[Detection]:
        inputs = self.inputs(images=[image])
        out = self.model(**inputs)
        post = self.processor.post_process_instance_segmentation(
            out, threshold=0.0, target_sizes=[(image.height, image.width)], return_binary_maps=True
        )[0]
        if post["segmentation"] is None:
            return []
        masks = post["segmentation"].bool().cpu().numpy()
        id2label = self.model.config.id2label
        dets = []
        for mask, info in zip(masks, post["segments_info"], strict=True):
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            label = panoptic_label(id2label[int(info["label_id"])])
            dets.append({"bbox": box, "label": label, "score": round(float(info["score"]), 4), "mask": mask})
        return dets


def panoptic_label(name: str) -> str:
    """COCO-panoptic class names as words: 'wall-other-merged' -> 'wall', 'door-stuff' -> 'door'."""
    for suffix in ("-merged", "-other", "-stuff"):
        name = name.removesuffix(suffix)
    return name.replace("-", " ")


# The label set of `facebook/mask2former-*-coco-panoptic`: the tiny model uses it so its detections name
# real classes.
COCO_PANOPTIC_LABELS = load_vocabulary(["coco_panoptic"])


def tiny_mask2former_config(labels: list[str]) -> Any:
    from transformers import Mask2FormerConfig

    return Mask2FormerConfig(
        backbone_config=_tiny_swin(["stage1", "stage2", "stage3", "stage4"]),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=10,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        use_pretrained_backbone=False,
    )


def _tiny_swin(out_features: list[str]) -> dict[str, Any]:
    """The small Swin backbone of the tiny Grounding DINO and Mask2Former builds."""
    return {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
            "window_size": 4, "image_size": TINY_IMAGE_SIZE, "out_features": out_features}  # fmt: skip


def _tiny_encoder() -> dict[str, int]:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


DETECTORS = {"owlv2": _Owlv2, "grounding_dino": _GroundingDino, "mask2former": _Mask2Former}


def with_own_masks(dets: list[Detection], source: str) -> list[Detection]:
    """Detections that came with a binary mask store it as COCO RLE, named by the model that made it
    (the masks stage prompts SAM2 only for detections without one)."""
    for d in dets:
        if "mask" in d:
            d["segmentation"] = encode_mask(d.pop("mask"))
            d["segmentation_source"] = source
    return dets


class OpenVocabDetection(Stage):
    name = "detection"
    provides = ("detections",)
    uses = ("tags",)  # queried with the image's tags (when a tagging stage ran) plus `classes`

    @dataclass
    class Params:
        detector: str = "owlv2"  # owlv2 | grounding_dino | mask2former: which model class `model.id` is
        classes: list[str] = field(default_factory=list)  # always queried, after the tags
        use_tags: bool = True
        max_queries: int = 16
        query_template: str = "a photo of a {}"  # OWLv2's text query form; Grounding DINO uses bare words
        score_threshold: float = 0.1  # this model's threshold (GranD: 0.1 .. 0.6 by model)
        nms_iou: float = 0.9
        max_boxes: int = 50

    def setup(self) -> None:
        if self.params.detector not in DETECTORS:
            raise ValueError(f"params.detector: {self.params.detector!r} is not one of {sorted(DETECTORS)}")
        device = device_for(self.model_spec, self.resources)
        dtype = dtype_for(self.model_spec, device)
        self.detector = DETECTORS[self.params.detector](self.model_spec, device, dtype, self.seed)

    def process(self, samples: list[Sample]) -> None:
        p = self.params
        for view in views_of(samples):
            queries = detection_queries(view.record.get("tags", []), p.classes, p.use_tags, p.max_queries)
            asks = queries or not self.detector.open_vocabulary
            dets = self.detector.detect(view.image, queries, p.query_template) if asks else []
            kept = with_own_masks(
                filter_detections(dets, p.score_threshold, p.nms_iou, p.max_boxes), self.model_spec.id
            )
            # keyed by stage: voting counts agreeing stages, two checkpoints of one family included
            view.record.setdefault("detections", {})[self.stage_id] = kept

    def provenance(self) -> dict[str, Any]:
        p = self.params
        return super().provenance() | {
            "detector": p.detector,
            "score_threshold": p.score_threshold,
            "nms_iou": p.nms_iou,
        }
