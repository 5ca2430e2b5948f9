"""CASS's math (Kim et al., "Distilling Spectral Graph for Object Context Aware Open-Vocabulary
Semantic Segmentation", CVPR 2025, arXiv 2411.17150), as plain functions on tensors.

Facts from the paper and its official code (micv-yonsei/CASS, `clip/model.py`, `cass_segmentor.py`),
written anew here:

- an attention graph per head is the key-key affinity `K K^T * d^-1/2` over the patch tokens;
- each graph's signature is its top eigenvalues (L2- then L1-normalised); CLIP and DINO heads are
  compared by the 1-D Wasserstein distance of these spectra and matched by the Hungarian algorithm
  to be *complementary* (the assignment maximises the distance; the official code builds its cost
  matrix DINO-by-CLIP but blends with the indices swapped, this follows the paper: each CLIP head
  gets the DINO head it was matched to);
- the matched DINO graph is reduced to a low rank chosen by singular-value energy (0.95), its
  singular values stretched from [min, max] to [0.5 min, 1.5 max] ("dynamic eigenscaling"), its
  diagonal zeroed, rescaled to the CLIP graph's range, and blended in with weight `w * lambda`
  (w: the pair's spectral distance, lambda = 10): `(w l D + C) / (w l + 1)`;
- a Gaussian neighbourhood bias over the patch grid (NACLIP's) is added before the softmax;
- the object-presence prior is CLIP's global image embedding against the text embeddings: per
  cluster of similar classes (Ward linkage of cosine distances) the class most present in the image
  has its text embedding pulled towards its best-matching patches, and the final patch-class scores
  mix in the prior: `(1 - gamma) S + gamma P`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def key_graphs(keys: torch.Tensor) -> torch.Tensor:
    """Attention graphs (H, N, N) from per-head patch keys (H, N, d): scaled key-key affinities."""
    return keys @ keys.transpose(-1, -2) * keys.shape[-1] ** -0.5


def top_eigenvalues(graphs: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest eigenvalues of each symmetric graph (H, N, N) -> (H, min(k, N)), descending."""
    values = torch.linalg.eigvalsh(graphs.double())  # ascending
    return values.flip(-1)[..., :k]


def spectral_distribution(eigenvalues: torch.Tensor) -> torch.Tensor:
    """A spectrum as CASS compares it: L2-normalised, then scaled to unit L1 norm."""
    unit = torch.nn.functional.normalize(eigenvalues, p=2, dim=-1)
    return torch.nn.functional.normalize(unit, p=1, dim=-1)


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> float:
    """Sum of absolute differences of the sorted values (CASS's spectral distance; for two equal-size
    samples with unit weights this is their 1-D Wasserstein distance times the sample size)."""
    return float(torch.sum(torch.abs(torch.sort(u).values - torch.sort(v).values)))


def spectral_distances(clip_graphs: torch.Tensor, dino_graphs: torch.Tensor, k: int) -> np.ndarray:
    """(H_clip, H_dino) Wasserstein distances between the heads' normalised top-k spectra."""
    k = min(k, clip_graphs.shape[-1], dino_graphs.shape[-1])
    clip = spectral_distribution(top_eigenvalues(clip_graphs, k))
    dino = spectral_distribution(top_eigenvalues(dino_graphs, k))
    return np.array([[wasserstein_1d(c, d) for d in dino] for c in clip])


def complementary_matching(distances: np.ndarray) -> list[tuple[int, int]]:
    """Hungarian assignment of CLIP heads (rows) to DINO heads (columns) that maximises the summed
    spectral distance: each CLIP head gets the DINO head whose structure differs most. A rectangular
    matrix leaves the surplus heads of the larger side unmatched."""
    rows, cols = linear_sum_assignment(distances, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def energy_rank(singular_values: torch.Tensor, threshold: float = 0.95) -> int:
    """The fewest leading singular values whose sum reaches `threshold` of the total (at least 1)."""
    total = singular_values.sum()
    if total <= 0:
        return 1
    cumulative = torch.cumsum(singular_values, 0) / total
    return min(int((cumulative < threshold).sum()) + 1, len(singular_values))


def eigenscale(singular_values: torch.Tensor) -> torch.Tensor:
    """Dynamic eigenscaling: stretch [min, max] linearly onto [0.5 min, 1.5 max], amplifying the
    leading components relative to the weak ones (unchanged when all values are equal)."""
    lo, hi = singular_values.min(), singular_values.max()
    if hi <= lo:
        return singular_values.clone()
    return (singular_values - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo


def low_rank_graph(graph: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """The energy-based low-rank, eigenscaled approximation of a graph (N, N), diagonal zeroed."""
    u, s, vh = torch.linalg.svd(graph.double())
    r = energy_rank(s, threshold)
    approx = u[:, :r] @ torch.diag(eigenscale(s[:r])) @ vh[:r]
    approx.fill_diagonal_(0)
    return approx.to(graph.dtype)


def rescale_range(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` mapped linearly onto the value range of `target` (a constant maps to target's min)."""
    lo, hi = source.min(), source.max()
    unit = (source - lo) / (hi - lo) if hi > lo else torch.zeros_like(source)
    return unit * (target.max() - target.min()) + target.min()


def distill_graphs(
    clip_graphs: torch.Tensor,
    dino_graphs: torch.Tensor,
    k_eigen: int = 20,
    scale_factor: float = 10.0,
    energy_threshold: float = 0.95,
) -> torch.Tensor:
    """CLIP's graphs (H, N, N) with each head's complementary DINO graph distilled in; CLIP heads
    left unmatched (DINO has fewer heads) keep their own graph."""
    distances = spectral_distances(clip_graphs, dino_graphs, k_eigen)
    out = clip_graphs.clone()
    for c, d in complementary_matching(distances):
        dino = rescale_range(low_rank_graph(dino_graphs[d], energy_threshold), clip_graphs[c])
        weight = float(distances[c, d]) * scale_factor
        out[c] = (weight * dino + clip_graphs[c]) / (weight + 1)
    return out


def gaussian_neighbourhood(height: int, width: int, std: float) -> torch.Tensor:
    """(N, N) bias exp(-|p - q|^2 / (2 std^2)) between the patches p, q of an h x w grid (NACLIP's
    spatial prior, which CASS adds to the distilled graph before the softmax)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    return torch.exp(-(torch.cdist(points, points) ** 2) / (2 * std**2))


def class_clusters(text_emb: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster index per class: Ward linkage of the classes' cosine distances cut at `threshold`
    (0 keeps every class in its own cluster)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(text_emb)
    if n < 2 or threshold <= 0:
        return np.arange(n)
    unit = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    distance = np.clip(1 - unit @ unit.T, 0, None)
    np.fill_diagonal(distance, 0)
    tree = linkage(squareform((distance + distance.T) / 2, checks=False), method="ward")
    return fcluster(tree, t=threshold, criterion="distance") - 1


def presence_adjusted_texts(
    patches: torch.Tensor,
    texts: torch.Tensor,
    presence: torch.Tensor,
    clusters: np.ndarray,
    weight: float,
    top_k: int = 2,
) -> torch.Tensor:
    """Object-guided text embeddings: in each cluster, the class the global embedding finds most
    present moves towards the mean of its `top_k` most similar patches, by `weight`. `patches` (N, D)
    and `texts` (C, D) are L2-normalised, `presence` is (C,)."""
    adjusted = texts.clone()
    if weight <= 0:
        return adjusted
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        best = int(members[int(torch.argmax(presence[members]))])
        nearest = torch.topk(patches @ texts[best], min(top_k, len(patches))).indices
        mean = torch.nn.functional.normalize(patches[nearest].mean(0), dim=0)
        adjusted[best] = torch.nn.functional.normalize((1 - weight) * texts[best] + weight * mean, dim=0)
    return adjusted


def presence_scores(
    patches: torch.Tensor, texts: torch.Tensor, presence: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Object-perspective patch-class similarity (N, C): `(1 - gamma) patches @ texts^T + gamma presence`."""
    return (1 - gamma) * patches @ texts.T + gamma * presence[None]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows covering [0, length) (the last one flush with the end)."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})
