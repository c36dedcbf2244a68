"""Softmax entropy and the reliable-sample filter of SAR/EATA used by IMSE (docs/design.md §6)."""
import math

import torch
from torch import Tensor


def softmax_entropy(logits: Tensor) -> Tensor:
    """H(softmax(logits)) per row of (B, C) logits, in at least float32 (bf16/fp16 logits are upcast)."""
    if logits.dim() != 2:
        raise ValueError(f"softmax_entropy: expected (batch, classes) logits, got shape {tuple(logits.shape)}")
    z = logits if logits.dtype == torch.float64 else logits.float()
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def entropy_threshold(num_classes: int, margin: float = 0.4) -> float:
    """E0 = margin · ln C: samples with entropy below it are 'reliable'."""
    if num_classes < 2:
        raise ValueError(f"entropy_threshold: need at least 2 classes, got {num_classes}")
    if not margin > 0:
        raise ValueError(f"entropy_threshold: margin must be > 0, got {margin}")
    return margin * math.log(num_classes)


def reliable_mask(entropy: Tensor, threshold: float) -> Tensor:
    """Boolean mask of the samples whose entropy is below `threshold` (NaN entropies are unreliable)."""
    return entropy < threshold


def reliable_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy over the masked samples; 0 (still in the graph) when none is reliable.

    The official code takes the mean of an empty tensor (NaN value, zero gradient); a zero keeps the
    same gradient and a finite loss, so the diversity term alone drives that step.
    """
    selected = entropy[mask]
    return selected.mean() if selected.numel() else selected.sum()
