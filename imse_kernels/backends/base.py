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


class SpectralBackend:
    name: str = "abstract"

    def unavailable_reason(self) -> Optional[str]:
        """None when usable on this machine, else why not (shown by `python -m imse_kernels`)."""
        return None

    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def factorized_forward(self, x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, bias: Optional[Tensor], save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        """y = ((x·Vhᵀ) ⊙ s)·Uᵀ + bias, and h = x·Vhᵀ when save_h (else None)."""
        raise NotImplementedError

    def recompose(self, U: Tensor, s: Tensor, Vh: Tensor) -> Tensor:
        """W = (U ⊙ s)·Vh in U's dtype."""
        raise NotImplementedError

    def factorized_backward(self, grad: Tensor, h: Tensor, U: Tensor, s: Tensor, Vh: Tensor, need_dx: bool) -> tuple[Optional[Tensor], Tensor]:
        """t = grad·U; ds = Σ_n h ⊙ t; dx = (t ⊙ s)·Vh when need_dx (else None)."""
        raise NotImplementedError

    def factorized_input_grad(self, grad: Tensor, U: Tensor, s: Tensor, Vh: Tensor) -> Tensor:
        """dx = ((grad·U) ⊙ s)·Vh, for a layer whose s is frozen."""
        raise NotImplementedError

    def recomposed_backward(self, grad: Tensor, x: Tensor, U: Tensor, s: Tensor, Vh: Tensor, W: Tensor, need_dx: bool) -> tuple[Optional[Tensor], Tensor]:
        """G = gradᵀ·x; ds = rowsum((Uᵀ·G) ⊙ Vh); dx = grad·W when need_dx (else None)."""
        raise NotImplementedError

    def measured_route(self, n: int, d_in: int, d_out: int, r: int, need_ds: bool, need_dx: bool,
                       has_weight: bool, dtype: torch.dtype, device: torch.device) -> Optional[int]:
        """FACTORIZED or RECOMPOSED from measurements, or None to let the planner's FLOP model decide."""
        return None

    # Dense GEMMs of the recomposed route; every backend may keep these.
    def dense_forward(self, x: Tensor, W: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.nn.functional.linear(x, W, bias)

    def dense_input_grad(self, grad: Tensor, W: Tensor) -> Tensor:
        return grad @ W
