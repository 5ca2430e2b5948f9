"""The mask verifier (SAM 3's SA-Co engine, arXiv 2511.16719: an AI verifier of mask quality before
any human): per object, evidence that needs no new model, an optional CLIP check and an optional
VLM judge, folded into `verification: {score, accepted, reasons}`.

Features, each in [0, 1] (pure functions below, tested on hand-built masks):

- `predicted_iou`: SAM2's own IoU estimate of its mask (the masks stage stores it);
- `stability`: SAM's stability score, the IoU of the mask at logit thresholds -delta and +delta
  (SAM's automatic mask generator, `calculate_stability_score`); the masks stage stores it;
- `box_agreement`: IoU of the mask's tight box with the object's detector box;
- `boundary_alignment`: the share of the mask's boundary pixels that lie on an image edge, an edge
  being a Sobel gradient at least `edge_ratio` of the strongest gradients in a band around the
  boundary (so the measure is local: a faint object on a busy texture is judged against itself);
- `clip_agreement` (when `clip_model` is set): CLIP's zero-shot probability of the object's label
  for its crop among the frame's labels, divided by the best label's probability.

An object is accepted when every present feature reaches its minimum and their mean reaches
`min_score`; `reasons` names each failed check. The judge (`judge: true`) shows a VLM the picture
with the mask drawn and asks for `accept` or `reject`, parsed and retried like the other LLM
stages' outputs (`generate_checked`); a `reject` rejects, an answer that never parses is recorded
(`judge: error`) and changes nothing. Behind the HTTP backend the picture goes as an image part; the
transformers backend is text-only, so it reads the label, box and mask size instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from groundmill.schema import FrameRecord, MaskFeatures, MaskVerification, Object, decode_mask
from groundmill.stages.base import ModelSpec, Sample, View, views_of
from groundmill.stages.boxes import box_iou
from groundmill.stages.llm import Generation, generate_checked, require_stop
from groundmill.stages.llm.stage import LLMStage

FEATURES = ("predicted_iou", "stability", "box_agreement", "boundary_alignment", "clip_agreement")


def stability_score(logits: np.ndarray, delta: float = 1.0) -> float:
    """IoU of `logits > delta` and `logits > -delta` (SAM's stability score; 0 for an empty mask)."""
    loose = int((logits > -delta).sum())
    return float((logits > delta).sum()) / loose if loose else 0.0


def tight_box(mask: np.ndarray) -> list[float]:
    """xyxy pixel box of a bool mask (zeros when empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def box_agreement(mask: np.ndarray, box: list[float]) -> float:
    """IoU of the mask's tight box with `box`."""
    return float(box_iou(np.array([tight_box(mask)]), np.array([box]))[0, 0])


def edge_map(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude (H, W), the largest over the colour channels."""
    rgb = image.astype(np.float32)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    mags = [
        np.hypot(ndimage.sobel(rgb[..., c], 0), ndimage.sobel(rgb[..., c], 1)) for c in range(rgb.shape[2])
    ]
    return np.max(mags, axis=0)


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's inner boundary pixels (in the mask, next to a pixel outside it or the border)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_alignment(mask: np.ndarray, edges: np.ndarray, edge_ratio: float = 0.4) -> float:
    """Share of boundary pixels within one pixel of an edge: a gradient >= `edge_ratio` x the 95th
    percentile of gradients in a band around the boundary (width grows with the mask's size)."""
    rim = boundary(mask)
    if not rim.any():
        return 0.0
    width = max(3, int(round(0.2 * np.sqrt(mask.sum()))))
    band = ndimage.binary_dilation(rim, iterations=width)
    strong = np.percentile(edges[band], 95)
    if strong <= 0:
        return 0.0
    near = ndimage.maximum_filter(edges, size=3)
    return float((near[rim] >= edge_ratio * strong).mean())


def decide(features: dict[str, float], minimums: dict[str, float], min_score: float) -> MaskVerification:
    """Score (the features' mean), acceptance and the failed checks of one object."""
    reasons = [f"{k} < {minimums[k]}" for k, v in features.items() if k in minimums and v < minimums[k]]
    score = float(np.mean(list(features.values()))) if features else 0.0
    if score < min_score:
        reasons.append(f"score < {min_score}")
    return MaskVerification(
        score=round(score, 4),
        accepted=not reasons,
        reasons=reasons,
        features=MaskFeatures(**{k: round(v, 4) for k, v in features.items()}),
    )


def mask_features(obj: Object, mask: np.ndarray, edges: np.ndarray, edge_ratio: float) -> dict[str, float]:
    """The model-free features of one object (those its record holds the inputs of)."""
    out: dict[str, float] = {}
    if "predicted_iou" in obj:
        out["predicted_iou"] = float(np.clip(obj["predicted_iou"], 0.0, 1.0))
    if "stability_score" in obj:
        out["stability"] = float(obj["stability_score"])
    out["box_agreement"] = box_agreement(mask, obj["bbox"])
    out["boundary_alignment"] = boundary_alignment(mask, edges, edge_ratio)
    return out


def parse_verdict(gen: Generation) -> str:
    """'accept' or 'reject': the first of the two words in the answer."""
    words = require_stop(gen).lower().replace(".", " ").split()
    for w in words:
        if w in ("accept", "reject"):
            return w
    raise ValueError(f"no accept/reject in {' '.join(words)[:60]!r}")


def draw_mask(image: Image.Image, mask: np.ndarray, box: list[float]) -> Image.Image:
    """The picture with the mask tinted red and its box outlined, what the judge is shown."""
    rgb = np.asarray(image.convert("RGB")).copy()
    rgb[mask] = (0.5 * rgb[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
    out = Image.fromarray(rgb)
    ImageDraw.Draw(out).rectangle(box, outline=(255, 255, 0), width=2)
    return out


def crop_box(box: list[float]) -> tuple[int, int, int, int]:
    """A box rounded outwards to whole pixels, at least one pixel wide and high."""
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    return x0, y0, max(x0 + 1, int(np.ceil(box[2]))), max(y0 + 1, int(np.ceil(box[3])))


def masked_objects(frame: FrameRecord) -> list[Object]:
    return [o for g in ("objects", "floating_objects") for o in frame.get(g, []) if "segmentation" in o]


class MaskVerificationStage(LLMStage):
    name = "mask_verification"
    provides = ("objects.verification",)
    requires = ("objects",)
    prompt_name = "mask_judge"

    @dataclass
    class Params(LLMStage.Params):
        min_score: float = 0.5
        min_predicted_iou: float = 0.5
        min_stability: float = 0.6
        min_box_agreement: float = 0.7
        min_boundary_alignment: float = 0.5
        min_clip_agreement: float = 0.3
        edge_ratio: float = 0.4  # an edge: this share of the strongest gradients near the boundary
        clip_model: str = ""  # "" = no CLIP check; "tiny", an open_clip id or a hub id (stages.clip)
        judge: bool = False  # the VLM judge (the stage's model and `llm` backend)
        max_new_tokens: int = 8
        temperature: float = 0.0

    def uses_llm(self) -> bool:
        return self.params.judge

    def minimums(self) -> dict[str, float]:
        return {k: getattr(self.params, f"min_{k}") for k in FEATURES}

    def provenance(self) -> dict[str, Any]:
        p = self.params
        info = super().provenance() | {"min_score": p.min_score, "minimums": self.minimums()}
        if p.clip_model:
            from groundmill.stages.hub import random_weights

            clip_random = random_weights(ModelSpec(id=p.clip_model))
            info |= {"clip_model": p.clip_model, "clip_random_weights": clip_random}
            info["random_weights"] = info.get("random_weights", False) or clip_random
        return info

    def setup(self) -> None:
        super().setup()
        self.clip = None
        if self.params.clip_model:
            from groundmill.stages.clip import load_clip

            self.clip = load_clip(ModelSpec(id=self.params.clip_model), self.resources, self.seed)

    def clip_agreement(self, image: Image.Image, objects: list[Object]) -> list[float]:
        """Per object: P(own label | crop) / max_label P(label | crop) among the frame's labels."""
        from groundmill.stages.clip import zero_shot_probs

        labels = sorted({o["labels"][0] for o in objects if o["labels"]})
        if len(labels) < 2:
            return [1.0] * len(objects)
        crops = [image.crop(crop_box(o["bbox"])) for o in objects]
        text = self.clip.encode_texts([f"a photo of a {lab}" for lab in labels])
        probs = zero_shot_probs(self.clip.encode_images(crops), text, self.clip.logit_scale)
        own = [labels.index(o["labels"][0]) if o["labels"] else 0 for o in objects]
        return [float(p[k] / p.max()) for p, k in zip(probs, own, strict=True)]

    def verify_view(self, view: View) -> list[tuple[Object, np.ndarray]]:
        objects = masked_objects(view.record)
        if not objects:
            return []
        edges = edge_map(np.asarray(view.image))
        masks = [decode_mask(o["segmentation"]) for o in objects]
        clip = self.clip_agreement(view.image, objects) if self.clip is not None else None
        for k, (obj, mask) in enumerate(zip(objects, masks, strict=True)):
            features = mask_features(obj, mask, edges, self.params.edge_ratio)
            if clip is not None:
                features["clip_agreement"] = clip[k]
            obj["verification"] = decide(features, self.minimums(), self.params.min_score)
        return list(zip(objects, masks, strict=True))

    def judge(self, items: list[tuple[View, Object, np.ndarray]]) -> None:
        from groundmill.stages.llm.http import image_part

        prompts = []
        for view, obj, mask in items:
            text = self.prompt.render(
                label=obj["labels"][0] if obj["labels"] else "object",
                box=[round(v) for v in obj["bbox"]],
                area=int(mask.sum()),
            )
            messages = [dict(m) for m in text.messages]
            if self.params.llm.backend == "http":
                picture = draw_mask(view.image, mask, obj["bbox"])
                messages[-1]["content"] = [
                    image_part(picture),
                    {"type": "text", "text": messages[-1]["content"]},
                ]
            prompts.append(messages)
        results = generate_checked(
            self.backend, prompts, self.sampling(), parse_verdict, self.params.attempts
        )
        for (_, obj, _), result in zip(items, results, strict=True):
            v = obj["verification"]
            v["judge"] = result.value if result.ok else "error"
            if result.value == "reject":
                v["accepted"] = False
                v["reasons"].append("judge: reject")

    def process(self, samples: list[Sample]) -> None:
        pending = []
        for view in views_of(samples):
            pending += [(view, obj, mask) for obj, mask in self.verify_view(view)]
        if self.params.judge and pending:
            self.judge(pending)
        for sample in samples:
            verdicts = [o["verification"] for v in sample.views() for o in masked_objects(v.record)]
            if verdicts:
                sample.stats["mask_verification.accepted"] = float(sum(v["accepted"] for v in verdicts))
                sample.stats["mask_verification.rejected"] = float(sum(not v["accepted"] for v in verdicts))
