"""The interface every backend implements: five primitives on 2-D row-major tensors.

Shapes: x (N, d_in), U (d_out, r), s (r,), Vh (r, d_in), h = x·Vhᵀ (N, r), W = (U ⊙ s)·Vh
(d_out, d_in), grad (N, d_out). x, U, Vh (and bias, W) share one dtype; s is float32 (or float64);
ds is returned in s's dtype. Low-precision inputs accumulate in float32.
The autograd formula and the route planner live in `imse_kernels.ops`; backends only compute.
"""
from typing import Optional

import torch
from torch import Tensor

# The two routes (docs/design.md, section 2): factorized x·Vhᵀ, scale, ·Uᵀ; or recomposed W' = (U ⊙ s)·Vh.
FACTORIZED = 0
RECOMPOSED = 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (low-precision inputs accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _past_the_end(index: Tensor, k: int) -> Tensor:
    """index with every code outside [0, k) replaced by k: one row past the table, which the callers
    make a NaN row (gather) or a discarded sum (segments), so a bad code never faults a device."""
    return torch.where((index >= 0) & (index < k), index, torch.full_like(index, k))


def gather_scale(h: Tensor, S: Tensor, index: Tensor) -> Tensor:
    """h ⊙ S[index] row by row, computed in the accumulation dtype and returned in h's dtype. A code
    outside [0, K) gives a NaN row, as the CUDA gather kernel does (docs/design.md §5)."""
    acc = accumulation_dtype(h.dtype)
    table = torch.cat([S.to(acc), S.new_full((1, S.shape[1]), float("nan"), dtype=acc)])
    return (h.to(acc) * table.index_select(0, _past_the_end(index, S.shape[0]))).to(h.dtype)


def segment_sum(rows: Tensor, index: Tensor, k: int) -> Tensor:
    """(k, r): out[c] = Σ_{n: index[n]=c} rows[n], deterministic on every device (no float atomics);
    rows whose code is outside [0, k) add to nothing.

    On the CPU `index_add_` is a serial, ordered loop; elsewhere `sorted_segment_sum` serves."""
    if rows.device.type == "cpu":
        return rows.new_zeros((k + 1, rows.shape[1])).index_add_(0, _past_the_end(index, k), rows)[:k]
    return sorted_segment_sum(rows, index, k)


def sorted_segment_sum(rows: Tensor, index: Tensor, k: int) -> Tensor:
    """`segment_sum` by a stable sort of the rows by code and one reduction per segment."""
    index = _past_the_end(index, k)
    order = torch.argsort(index, stable=True)
    lengths = torch.bincount(index, minlength=k + 1)
    return torch.segment_reduce(rows.index_select(0, order), "sum", lengths=lengths, axis=0, unsafe=True)[:k]


class SpectralBackend:
    name: str = "abstract"

    def unavailable_reason(self) -> Optional[str]:
        """None when usable on this machine, else why not (shown by `python -m imse_kernels`)."""
        return None

    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def factorized_forward(self, x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, bias: Optional[Tensor],
                           save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        """y = ((x·Vhᵀ) ⊙ s)·Uᵀ + bias, and h = x·Vhᵀ when save_h (else None)."""
        raise NotImplementedError

    def recompose(self, U: Tensor, s: Tensor, Vh: Tensor) -> Tensor:
        """W = (U ⊙ s)·Vh in U's dtype."""
        raise NotImplementedError

    def factorized_backward(self, grad: Tensor, h: Tensor, U: Tensor, s: Tensor, Vh: Tensor,
                            need_dx: bool) -> tuple[Optional[Tensor], Tensor]:
        """t = grad·U; ds = Σ_n h ⊙ t; dx = (t ⊙ s)·Vh when need_dx (else None)."""
        raise NotImplementedError

    def factorized_input_grad(self, grad: Tensor, U: Tensor, s: Tensor, Vh: Tensor) -> Tensor:
        """dx = ((grad·U) ⊙ s)·Vh, for a layer whose s is frozen."""
        raise NotImplementedError

    def recomposed_backward(self, grad: Tensor, x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, W: Tensor,
                            need_dx: bool) -> tuple[Optional[Tensor], Tensor]:
        """G = gradᵀ·x; ds = rowsum((Uᵀ·G) ⊙ Vh); dx = grad·W when need_dx (else None)."""
        raise NotImplementedError

    # Per-sample codes (docs/design.md §8): S is (K, r) and row n uses S[index[n]]; index is int64 (N,)
    # with values in [0, K), checked by the op in eager mode (here a bad code gives a NaN row). The defaults
    # are plain ATen ops (route F's two shared GEMMs around a gather-scale; dS by a fixed-order segmented
    # sum); backends may fuse them.
    def indexed_forward(self, x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, bias: Optional[Tensor], index: Tensor,
                        save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        """y_n = ((x_n·Vhᵀ) ⊙ S[index[n]])·Uᵀ + bias, and h = x·Vhᵀ when save_h (else None)."""
        h = x @ Vh.t()
        hs = gather_scale(h, S, index)
        y = torch.addmm(bias, hs, U.t()) if bias is not None else hs @ U.t()
        return y, (h if save_h else None)

    def indexed_backward(self, grad: Tensor, h: Tensor, U: Tensor, S: Tensor, Vh: Tensor, index: Tensor,
                         need_dx: bool) -> tuple[Optional[Tensor], Tensor]:
        """t = grad·U; dS[k] = Σ_{n: index[n]=k} h_n ⊙ t_n; dx = (t ⊙ S[index])·Vh when need_dx."""
        t = grad @ U
        acc = accumulation_dtype(h.dtype)
        dS = segment_sum(h.to(acc) * t.to(acc), index, S.shape[0]).to(S.dtype)
        return (gather_scale(t, S, index) @ Vh if need_dx else None), dS

    def indexed_input_grad(self, grad: Tensor, U: Tensor, S: Tensor, Vh: Tensor, index: Tensor) -> Tensor:
        """dx = ((grad·U) ⊙ S[index])·Vh, for codes that are frozen."""
        return gather_scale(grad @ U, S, index) @ Vh

    def measured_route(self, n: int, d_in: int, d_out: int, r: int, need_ds: bool, need_dx: bool,
                       has_weight: bool, dtype: torch.dtype, device: torch.device) -> Optional[int]:
        """FACTORIZED or RECOMPOSED from measurements, or None to let the planner's FLOP model decide."""
        return None

    # Dense GEMMs of the recomposed route; every backend may keep these.
    def dense_forward(self, x: Tensor, W: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.nn.functional.linear(x, W, bias)

    def dense_input_grad(self, grad: Tensor, W: Tensor) -> Tensor:
        return grad @ W
