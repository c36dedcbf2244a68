"""Per-expert alignment moments for the diversity loss (docs/design.md §6).

For a spectral layer with right singular vectors Vh (r × d_in) and input tokens x (…, d_in), the
alignment of token n with expert k is a_nk = x̂_n · v_k with x̂_n = x_n / ‖x_n‖. The diversity loss
needs, per expert, the unbiased std of a over all rows n. Everything it needs is the triple
(Σ_n a_nk, Σ_n a_nk², n): this function is the one place that computes it, so a backend whose fused
forward already holds h = x·Vhᵀ (docs/design.md §3) can supply the same triple without a second GEMM.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class ExpertMoments(NamedTuple):
    """Σ a and Σ a² per expert (shape (r,), float32 or float64) over `count` rows."""
    sum: Tensor
    sum_sq: Tensor
    count: int


def expert_alignment_moments(x: Tensor, Vh: Tensor, eps: float = 1e-12, h: Optional[Tensor] = None) -> ExpertMoments:
    """Moments of the alignments of the unit-normalised rows of `x` with the rows of `Vh`.

    Differentiable with respect to `x` (the gradient reaches earlier layers); `Vh` is frozen.
    `h` = x·Vhᵀ (rows of x × r), when a factorized forward already computed it, replaces the GEMM:
    a = h / ‖x‖. The GEMM runs in the ambient (autocast) dtype; the reductions run in float32
    (float64 for float64 x).
    """
    if x.dim() < 1 or Vh.dim() != 2 or x.shape[-1] != Vh.shape[1]:
        raise ValueError(f"expert_alignment_moments: x {tuple(x.shape)} does not match Vh {tuple(Vh.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] < 2:
        raise ValueError("expert_alignment_moments: an unbiased std needs at least 2 rows (tokens)")
    if h is None:
        a = F.linear(F.normalize(rows, dim=-1, eps=eps), Vh.to(rows.dtype))
    elif tuple(h.shape) != (rows.shape[0], Vh.shape[0]):
        raise ValueError(f"expert_alignment_moments: h {tuple(h.shape)} is not x·Vhᵀ for x rows "
                         f"{tuple(rows.shape)} and Vh {tuple(Vh.shape)}")
    else:  # the norm reduces in float32 (float64) also for bf16 rows, so a comes out in that dtype
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        a = h / torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=acc).clamp_min(eps)
    a = a if a.dtype == torch.float64 else a.float()
    return ExpertMoments(a.sum(0), (a * a).sum(0), rows.shape[0])


def std_from_moments(m: ExpertMoments) -> Tensor:
    """Unbiased std per expert: sqrt((Σa² − (Σa)²/n) / (n − 1)).

    The variance is clamped at 1e-20 so that round-off (a slightly negative variance) or a constant
    expert gives a finite value and a finite gradient instead of NaN.
    """
    n = m.count
    var = (m.sum_sq - m.sum * m.sum / n) / (n - 1)
    return var.clamp_min(1e-20).sqrt()
