"""Near-duplicate marking across a run: CLIP image embeddings searched with faiss.

Exact duplicates are found by content key before any stage runs (`duplicate_of`); near-duplicates
(re-encodes, resizes, crops, burst shots) are found here. Each sample's image (a video's first
keyframe) is embedded with CLIP and compared by cosine similarity with every earlier sample the stage
has kept; at `threshold` or above it becomes `near_duplicate_of: <earlier key>` in the record, and
the index's `stats` gets `near_duplicate` (1) and `near_duplicate.similarity`. The sample is kept:
a consumer filters on the field.

Streaming, bounded memory: one actor (`max_actors: 1`) sees the samples in order, holding at most
`capacity` embeddings in `parts` faiss flat inner-product indexes; when the newest part is full the
oldest one is dropped whole (O(1) eviction, `capacity x dim x 4` bytes at most), so a near-duplicate
is found within the last `capacity` kept samples. The window spans one Ray Dataset of the run
(`run.inputs_per_dataset` inputs): the stage's actor restarts with each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from groundmill.stages.base import Sample, Stage


class RingIndex:
    """Nearest neighbour by inner product over the last `capacity` added vectors."""

    def __init__(self, dim: int, capacity: int, parts: int = 4):
        import faiss

        self._faiss = faiss
        self.dim, self.per_part, self.parts = dim, max(1, capacity // parts), parts
        self.indexes: list[Any] = []
        self.keys: list[list[str]] = []

    def __len__(self) -> int:
        return sum(len(k) for k in self.keys)

    def search(self, vector: np.ndarray) -> tuple[float, str | None]:
        """(similarity, key) of the closest kept vector, (-1, None) when there is none."""
        best, key = -1.0, None
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        for index, keys in zip(self.indexes, self.keys, strict=True):
            if keys:
                sims, ids = index.search(query, 1)
                if sims[0, 0] > best:
                    best, key = float(sims[0, 0]), keys[int(ids[0, 0])]
        return best, key

    def add(self, vector: np.ndarray, key: str) -> None:
        if not self.indexes or len(self.keys[-1]) >= self.per_part:
            if len(self.indexes) == self.parts:
                self.indexes.pop(0)
                self.keys.pop(0)
            self.indexes.append(self._faiss.IndexFlatIP(self.dim))
            self.keys.append([])
        self.indexes[-1].add(np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32))
        self.keys[-1].append(key)


class NearDuplicates(Stage):
    name = "near_duplicates"
    provides = ("near_duplicate_of",)

    @dataclass
    class Params:
        threshold: float = 0.95  # cosine similarity of CLIP image embeddings
        capacity: int = 1_000_000  # embeddings kept (memory: capacity x dim x 4 bytes)
        parts: int = 4

    def setup(self) -> None:
        from groundmill.stages.clip import load_clip

        self.clip = load_clip(self.model_spec, self.resources, self.seed)
        self.index: RingIndex | None = None

    def process(self, samples: list[Sample]) -> None:
        samples = [s for s in samples if s.media_type != "video" or s.frames]  # a video without keyframes
        embeddings = self.clip.encode_images([s.image(0) for s in samples])
        if self.index is None and len(embeddings):
            p = self.params
            self.index = RingIndex(embeddings.shape[1], p.capacity, p.parts)
        for sample, emb in zip(samples, embeddings, strict=True):
            similarity, key = self.index.search(emb)
            if key is not None and similarity >= self.params.threshold:
                sample.record["near_duplicate_of"] = key
                sample.stats["near_duplicate"] = 1.0
                sample.stats["near_duplicate.similarity"] = round(similarity, 4)
            else:
                self.index.add(emb, sample.key)

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"threshold": self.params.threshold, "capacity": self.params.capacity}
