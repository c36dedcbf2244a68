"""Pure PyTorch backend: runs on any device and is the oracle every other backend is tested against.
Its per-sample-code primitives are the protocol's ATen defaults (`base.py`)."""

import torch
from torch import Tensor

from .base import SpectralBackend
from .base import accumulation_dtype as _acc


def scale_columns(U: Tensor, s: Tensor) -> Tensor:
    """U ⊙ s (s over columns), computed in the accumulation dtype, returned in U's dtype."""
    acc = _acc(U.dtype)
    return (U.to(acc) * s.to(acc)).to(U.dtype)


def scale_rows(Vh: Tensor, s: Tensor) -> Tensor:
    """s ⊙ Vh (s over rows)."""
    acc = _acc(Vh.dtype)
    return (Vh.to(acc) * s.to(acc).unsqueeze(1)).to(Vh.dtype)


class TorchBackend(SpectralBackend):
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def factorized_forward(self, x, U, s, Vh, bias, save_h):
        h = x @ Vh.t()
        Us = scale_columns(U, s)
        y = torch.addmm(bias, h, Us.t()) if bias is not None else h @ Us.t()
        return y, (h if save_h else None)

    def recompose(self, U, s, Vh):
        return scale_columns(U, s) @ Vh

    def factorized_backward(self, grad, h, U, s, Vh, need_dx):
        t = grad @ U
        acc = _acc(h.dtype)
        ds = (h.to(acc) * t.to(acc)).sum(0).to(s.dtype)
        dx = t @ scale_rows(Vh, s) if need_dx else None
        return dx, ds

    def factorized_input_grad(self, grad, U, s, Vh):
        return (grad @ U) @ scale_rows(Vh, s)

    def recomposed_backward(self, grad, x, U, s, Vh, W, need_dx):
        acc = _acc(U.dtype)
        G = (grad.t() @ x).to(acc)
        ds = ((U.t().to(acc) @ G) * Vh.to(acc)).sum(1).to(s.dtype)
        dx = grad @ W if need_dx else None
        return dx, ds
