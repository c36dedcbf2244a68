"""What every launcher needs to know about where its kernels run, and the tile mapping they share.

Triton decides at decoration time whether `@triton.jit` kernels are compiled or interpreted
(`TRITON_INTERPRET=1` must be set before triton is imported); `INTERPRETED` records which it was,
so the launchers pick interpreter-safe settings (bf16 operands cast to fp32 before `tl.dot`, one
small tile configuration) and the backend knows CPU tensors are acceptable.
"""
import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ..precision import tf32_matmul_enabled


@triton.jit
def _probe():
    pass


INTERPRETED: bool = not isinstance(_probe, JITFunction)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def unavailable_reason() -> str | None:
    """None when the kernels can run here (a CUDA GPU, or the interpreter on CPU)."""
    if INTERPRETED or torch.cuda.is_available():
        return None
    return "no CUDA GPU, and TRITON_INTERPRET=1 was not set before triton was imported"


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu")


def cast_f32(dtype: torch.dtype) -> bool:
    """Whether kernels cast operands to fp32 before `tl.dot` (the interpreter mishandles bf16 dots)."""
    return INTERPRETED and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for fp32 operands: TF32 only where PyTorch's own matmuls may use it."""
    if dtype == torch.float32 and tf32_matmul_enabled():
        return "tf32"
    return "ieee"


def aligned(tensors, sizes) -> bool:
    """Whether a problem gets the JIT's aligned specialisation, as the ViT shapes do: every tensor starts on
    16 bytes, its strides other than 1 are multiples of 16 elements, and every size in `sizes` is a
    multiple of 16. Anything else loads element by element, needs more registers, and has its own list of
    dropped tiles (tuning.DROPPED)."""
    return all(n % 16 == 0 for n in sizes) and all(
        t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride() if st != 1) for t in tensors if t is not None)


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def capability(device: torch.device) -> int:
    """Compute capability as an int (80, 90, ...); 0 for the interpreter on CPU."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def check_operands(op: str, dtype_of: dict, same_device: bool = True) -> None:
    """Raise a clear error unless all named tensors share one kernel dtype and one device."""
    dtypes = {n: t.dtype for n, t in dtype_of.items()}
    first = next(iter(dtype_of.values()))
    if first.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: Triton kernels take float32, float16 or bfloat16, got {first.dtype}")
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{op}: operands must share one dtype, got {dtypes}")
    if same_device and len({t.device for t in dtype_of.values()}) > 1:
        raise ValueError(f"{op}: operands must be on one device, got { {n: t.device for n, t in dtype_of.items()} }")
    for n, t in dtype_of.items():
        if t.dim() != 2:
            raise ValueError(f"{op}: {n} must be 2-D, got shape {tuple(t.shape)}")
    if not supports(first.device):
        raise RuntimeError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
                           f"got {first.device}")


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: consecutive programs share row tiles (L2 reuse)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size
