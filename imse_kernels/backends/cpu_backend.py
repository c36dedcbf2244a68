"""C++ CPU backend (`csrc/cpu`): ATen GEMMs plus fused, deterministic OpenMP reductions for ds."""
from typing import Optional

import torch

from .. import _extension
from .base import SpectralBackend


class CpuBackend(SpectralBackend):
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return _extension.reason("_C")

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    @property
    def _ops(self):
        return torch.ops.imse_ext

    def factorized_forward(self, x, U, s, Vh, bias, save_h):
        y, h = self._ops.factorized_forward(x, U, s, Vh, bias, save_h)
        return y, (h if save_h else None)

    def recompose(self, U, s, Vh):
        return self._ops.recompose(U, s, Vh)

    def factorized_backward(self, grad, h, U, s, Vh, need_dx):
        dx, ds = self._ops.factorized_backward(grad, h, U, s, Vh, need_dx)
        return (dx if need_dx else None), ds

    def factorized_input_grad(self, grad, U, s, Vh):
        return self._ops.factorized_input_grad(grad, U, s, Vh)

    def recomposed_backward(self, grad, x, U, s, Vh, W, need_dx):
        dx, ds = self._ops.recomposed_backward(grad, x, U, s, Vh, W, need_dx)
        return (dx if need_dx else None), ds
