"""Image tagging: open_clip zero-shot over a shipped vocabulary (COCO + common scene words).

GranD uses RAM/Tag2Text for tags; the tags then query the open-vocabulary detectors. CLIP zero-shot
with a prompt ensemble is the offline-installable stand-in with the same role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from groundmill.schema import Tag
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.clip import load_clip, zero_shot_probs

VOCAB_DIR = Path(__file__).parent / "vocab"


def load_vocabulary(names: list[str]) -> list[str]:
    """Shipped vocabulary files (by stem) or explicit files, deduplicated in order."""
    words: dict[str, None] = {}
    for name in names:
        path = VOCAB_DIR / f"{name}.txt" if not name.endswith(".txt") else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"tag vocabulary {name!r} not found (looked for {path})")
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):  # '#' lines say where a list comes from
                words.setdefault(line.strip().lower(), None)
    return list(words)


def select_tags(probs: np.ndarray, labels: list[str], top_k: int, min_score: float) -> list[Tag]:
    """The top-k labels of one image whose probability reaches min_score, best first."""
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [Tag(label=labels[i], score=round(float(probs[i]), 4)) for i in order if probs[i] >= min_score]


class ClipTagging(Stage):
    name = "tagging"
    provides = ("tags",)

    @dataclass
    class Params:
        vocabularies: list[str] = field(default_factory=lambda: ["coco", "extra"])
        prompts: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a photo of the {}."])
        top_k: int = 8
        min_score: float = 0.02

    def setup(self) -> None:
        self.labels = load_vocabulary(self.params.vocabularies)
        self.clip = load_clip(self.model_spec, self.resources, self.seed)
        # Prompt ensemble: average the normalised text embeddings of each label's prompts.
        per_prompt = [self.clip.encode_texts([p.format(w) for w in self.labels]) for p in self.params.prompts]
        mean = np.mean(per_prompt, axis=0)
        self.text_emb = mean / np.linalg.norm(mean, axis=1, keepdims=True)

    def process(self, samples: list[Sample]) -> None:
        views = views_of(samples)
        probs = zero_shot_probs(
            self.clip.encode_images([v.image for v in views]), self.text_emb, self.clip.logit_scale
        )
        for view, p in zip(views, probs, strict=True):
            view.record["tags"] = select_tags(p, self.labels, self.params.top_k, self.params.min_score)
