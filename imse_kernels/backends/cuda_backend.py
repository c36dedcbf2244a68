"""C++/CUDA backend (`csrc/cuda`): tiled WMMA tensor-core kernels for fp16/bf16 (fp32 accumulation),
TF32 or exact fp32, fp64; fused s scaling, bias and deterministic ds reductions.

The ops are the `imse_ext` primitives (schema from the CPU extension `_C`), registered for the CUDA
dispatch key by `imse_kernels._C_cuda`. fp32 inputs run through TF32 tensor cores exactly when
torch allows TF32 for its own fp32 matmuls (`imse_kernels.precision.tf32_matmul_enabled`), like cuBLAS would.
"""
from typing import Optional

import torch

from .. import _extension
from .compiled_backend import CompiledBackend


def _cuda_built() -> Optional[bool]:
    try:
        from .. import _build_info
    except ImportError:
        return None
    return bool(getattr(_build_info, "CUDA_BUILT", False))


class CudaBackend(CompiledBackend):
    name = "cuda"

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

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"
