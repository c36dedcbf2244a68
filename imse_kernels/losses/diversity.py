"""Diversity-maximisation loss of IMSE (docs/design.md §6): spread of the spectral experts' responses.

Per layer: the unbiased std over batch × tokens of each expert's alignment with the unit-normalised
input tokens, then the mean of the k smallest stds, k = min(⌊r·ratio⌋, r − 1) — the official code
averages the stds strictly below the (k+1)-th smallest, which is the same set unless stds tie there.
Summed over the chosen layers and divided by the number of blocks they belong to. IMSE subtracts
λ times this from the entropy loss, so the least-used experts are pushed to respond more diversely.
"""
import math
from typing import Iterable

from torch import Tensor

from .expert_stats import ExpertMoments, std_from_moments


def lowest_k(r: int, ratio: float) -> int:
    """k = min(⌊r·ratio⌋, r − 1), which must be at least 1."""
    if not 0 < ratio <= 1:
        raise ValueError(f"diversity ratio must be in (0, 1], got {ratio}")
    k = min(math.floor(r * ratio), r - 1)
    if k < 1:
        raise ValueError(f"diversity ratio {ratio} selects no expert out of r={r} (k = min(floor(r·ratio), r−1) = {k})")
    return k


def lowest_k_mean(std: Tensor, ratio: float) -> Tensor:
    """Mean of the k smallest entries of the per-expert stds (1-D)."""
    if std.dim() != 1:
        raise ValueError(f"lowest_k_mean: expected a 1-D tensor of per-expert stds, got shape {tuple(std.shape)}")
    k = lowest_k(std.shape[0], ratio)
    return std.topk(k, largest=False, sorted=False).values.mean()


def layer_diversity(moments: ExpertMoments, ratio: float = 1.0) -> Tensor:
    """One layer's term: mean of the k smallest per-expert alignment stds."""
    return lowest_k_mean(std_from_moments(moments), ratio)


def diversity_loss(moments: Iterable[ExpertMoments], ratio: float = 1.0, num_blocks: int = 3) -> Tensor:
    """Σ over layers of `layer_diversity`, divided by `num_blocks`."""
    if num_blocks < 1:
        raise ValueError(f"diversity_loss: num_blocks must be >= 1, got {num_blocks}")
    terms = [layer_diversity(m, ratio) for m in moments]
    if not terms:
        raise ValueError("diversity_loss: no layer statistics were captured")
    return sum(terms[1:], terms[0]) / num_blocks
