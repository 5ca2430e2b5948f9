"""Scene (landmark) category: CLIP zero-shot over GranD's two-level category list.

GranD asks a VLM two multiple-choice questions: indoor / outdoor / transportation / sports and
recreation, then a fine class within the chosen one. Here CLIP answers both: a softmax over the coarse
categories picks one, then a softmax over that category's fine classes picks the fine class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from groundmill.schema import Landmark
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.clip import load_clip, zero_shot_probs
from groundmill.stages.vocab_groups import load_groups


def choose_landmark(coarse_probs: np.ndarray, categories: list[str], fine_probs: dict[str, np.ndarray],
                    hierarchy: dict[str, list[str]]) -> Landmark:  # fmt: skip
    """The best coarse category, then its best fine class; score = P(coarse) * P(fine | coarse)."""
    c = int(np.argmax(coarse_probs))
    category = categories[c]
    probs = fine_probs[category]
    f = int(np.argmax(probs))
    return Landmark(
        category=category, fine=hierarchy[category][f], score=round(float(coarse_probs[c] * probs[f]), 4)
    )


class ClipLandmark(Stage):
    name = "landmark"
    provides = ("landmark",)

    @dataclass
    class Params:
        categories: str = "scene_categories"  # a grouped vocabulary: `coarse: fine, fine, ...`
        coarse_prompts: list[str] = field(default_factory=lambda: ["a photo of a scene: {}.", "a {} scene."])
        fine_prompts: list[str] = field(
            default_factory=lambda: ["a photo of a {}.", "a photo taken at a {}."]
        )

    def setup(self) -> None:
        self.hierarchy = load_groups(self.params.categories)
        self.categories = list(self.hierarchy)
        self.clip = load_clip(self.model_spec, self.resources, self.seed)
        self.coarse_emb = self._ensemble(self.categories, self.params.coarse_prompts)
        self.fine_emb = {
            c: self._ensemble(fine, self.params.fine_prompts) for c, fine in self.hierarchy.items()
        }

    def _ensemble(self, words: list[str], prompts: list[str]) -> np.ndarray:
        mean = np.mean([self.clip.encode_texts([p.format(w) for w in words]) for p in prompts], axis=0)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)

    def process(self, samples: list[Sample]) -> None:
        views = views_of(samples)
        image_emb = self.clip.encode_images([v.image for v in views])
        scale = self.clip.logit_scale
        coarse = zero_shot_probs(image_emb, self.coarse_emb, scale)
        fine = {c: zero_shot_probs(image_emb, emb, scale) for c, emb in self.fine_emb.items()}
        for n, view in enumerate(views):
            per_view = {c: p[n] for c, p in fine.items()}
            view.record["landmark"] = choose_landmark(coarse[n], self.categories, per_view, self.hierarchy)
