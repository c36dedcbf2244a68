"""The compiled `imse_ext` primitives (schema in `csrc/spectral_schema.h`), shared by the C++ CPU and
CUDA backends: the dispatcher routes each call to the kernel registered for the tensors' device."""
import torch

from .base import SpectralBackend


class CompiledBackend(SpectralBackend):
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
