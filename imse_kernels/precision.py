"""Whether fp32 matmuls may run in TF32, read the way current torch wants it read.

torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none": inherit
`torch.backends.fp32_precision`). Reading the legacy `allow_tf32` flag raises once the two APIs have
been mixed, so the current API comes first and the legacy flag is only the fallback.
"""
import torch


def tf32_matmul_enabled() -> bool:
    """True when torch's own fp32 CUDA matmuls may use TF32; the kernels follow the same rule."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # legacy and current APIs mixed; the current one said neither tf32 nor ieee
        return False
