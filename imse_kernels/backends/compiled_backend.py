"""The compiled backends: the `imse_ext` primitives (schema in `csrc/spectral_schema.h`) of the C++
extensions, `cpu` (`csrc/cpu`, module `_C`) and `cuda` (`csrc/cuda`, module `_C_cuda`). One class;
the two flavours differ only in their device checks, and the dispatcher routes each call to the
kernel registered for the tensors' device (docs/design.md §3).

The CUDA ops run every plain GEMM on cuBLAS through ATen (so fp32 uses TF32 exactly when torch's own
matmuls do, docs/design.md §4) and keep two custom kernels: `chain`, the fused factorized forward /
input gradient with h = x·Vhᵀ kept on chip (fp16/bf16), and `ds`, the deterministic reduction
ds = Σ_n (grad·U) ⊙ h without float atomics. For per-sample codes (docs/design.md §8) the gather-scale
kernel follows the `chain` switch and the segmented dS kernel the `ds` switch. Each can be switched
back to the ATen path at run time:

- `cuda_fused_kernels(False)` (context manager, process-wide, restores on exit), or `True` to force
  the kernels wherever they can run, or `None` for the automatic rule; `kernels=("chain",)` or
  `("ds",)` limits it to one kernel;
- outside it, `IMSE_CUDA_FUSED=auto|1|0` (read at each call): `auto` (default) runs `ds` always and
  `chain` only on an architecture where it was measured faster than cuBLAS (none yet: no GPU has run
  it) and where its row blocks alone fill the GPU; `1` runs both wherever they can; `0` is the ATen
  path everywhere.

The switch is the op `torch.ops.imse_ext.cuda_fused_mode(kernel, mode=None)` of `_C_cuda`.
"""
import contextlib
from typing import Iterator, Optional

import torch

from .. import _extension
from .base import SpectralBackend

FUSED_KERNELS = ("chain", "ds")
_MODES = {None: -1, False: 0, True: 1}  # the C++ modes: -1 auto, 0 ATen path, 1 on (-2: follow the env var)


class CompiledBackend(SpectralBackend):
    device_type = "abstract"

    @property
    def _ops(self):
        return torch.ops.imse_ext

    def supports(self, device: torch.device) -> bool:
        return device.type == self.device_type

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

    # Per-sample codes (docs/design.md §8): on the CPU (`_C`) the gather-scale and the segmented dS are
    # fused OpenMP passes; on CUDA (`_C_cuda`) cuBLAS GEMMs around the gather-scale kernel, dS by the
    # deterministic segmented kernel (switches "chain" and "ds" respectively).
    def indexed_forward(self, x, U, S, Vh, bias, index, save_h):
        y, h = self._ops.indexed_forward(x, U, S, Vh, bias, index, save_h)
        return y, (h if save_h else None)

    def indexed_backward(self, grad, h, U, S, Vh, index, need_dx):
        dx, dS = self._ops.indexed_backward(grad, h, U, S, Vh, index, need_dx)
        return (dx if need_dx else None), dS

    def indexed_input_grad(self, grad, U, S, Vh, index):
        return self._ops.indexed_input_grad(grad, U, S, Vh, index)


class CpuBackend(CompiledBackend):
    """ATen GEMMs plus fused, deterministic OpenMP reductions for ds."""
    name = device_type = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return _extension.reason("_C")


def _cuda_built() -> Optional[bool]:
    try:
        from .. import _build_info
    except ImportError:
        return None
    return bool(getattr(_build_info, "CUDA_BUILT", False))


class CudaBackend(CompiledBackend):
    """cuBLAS (through ATen) plus the custom `chain` and `ds` kernels (module docstring)."""
    name = device_type = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is a build without CUDA"
        if _cuda_built() is False:
            return ("the CUDA extension was not built (at install time there was no nvcc/CUDA_HOME, "
                    "or IMSE_CUDA=0 / IMSE_NO_EXTENSION was set); reinstall with nvcc available")
        reason = _extension.reason("_C")
        if reason is not None:
            return f"the op library imse_kernels._C is unavailable: {reason}"
        reason = _extension.reason("_C_cuda")
        if reason is not None:
            return f"the CUDA extension imse_kernels._C_cuda is unavailable: {reason}"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        return None


def _cuda_ops():
    for module in ("_C", "_C_cuda"):
        reason = _extension.reason(module)
        if reason is not None:
            raise RuntimeError(f"imse_kernels: the CUDA kernel switch needs imse_kernels.{module}: {reason}")
    return torch.ops.imse_ext


@contextlib.contextmanager
def cuda_fused_kernels(enabled: Optional[bool] = True, kernels=FUSED_KERNELS, ops=None) -> Iterator[None]:
    """Within the block, the CUDA backend's custom kernels `kernels` are on (True: wherever they can
    run), off (False: the cuBLAS/ATen path) or automatic (None). Process-wide, like torch.backends
    flags; the previous settings come back on exit. `ops`: the op namespace steered (default
    torch.ops.imse_ext; the tests pass the emulator's)."""
    if enabled not in _MODES or isinstance(enabled, int) and not isinstance(enabled, bool):
        raise ValueError(f"cuda_fused_kernels: enabled must be True, False or None, got {enabled!r}")
    kernels = (kernels,) if isinstance(kernels, str) else tuple(kernels)
    unknown = set(kernels) - set(FUSED_KERNELS)
    if unknown:
        raise ValueError(f"cuda_fused_kernels: unknown kernels {sorted(unknown)}; choose from {FUSED_KERNELS}")
    ops = _cuda_ops() if ops is None else ops
    old = {k: ops.cuda_fused_mode(k, _MODES[enabled]) for k in kernels}
    try:
        yield
    finally:
        for k, mode in old.items():
            ops.cuda_fused_mode(k, mode)
