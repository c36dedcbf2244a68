"""Numeric capabilities and policy: whether fp32 matmuls may run in TF32, whether this CPU runs bf16/fp16
natively, and `autocast`, torch.autocast with the CPU policy of docs/design.md, section 14.

TF32: torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none": inherit
`torch.backends.fp32_precision`). Reading the legacy `allow_tf32` flag raises once the two APIs have
been mixed, so the current API comes first and the legacy flag is only the fallback.
"""
import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


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


# --------------------------------------------------------------------------------------------
# Low-precision autocast on the CPU (docs/design.md, section 14)

#: Set to 1 to run CPU autocast in a dtype this CPU has no native support for anyway (with a warning).
ALLOW_SLOW_ENV = "IMSE_ALLOW_SLOW_AUTOCAST"

_AMP_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_checked: set = set()  # dtypes `warn_slow_autocast` has looked at (it warns at most once per dtype)


class SlowAutocastError(ValueError):
    """Autocast was asked for in a dtype the device runs many times slower than float32."""


@functools.lru_cache(maxsize=None)
def cpu_native_dtype(dtype: torch.dtype) -> bool:
    """True when this CPU runs `dtype` (bf16 or fp16) GEMMs natively through oneDNN.

    bf16: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX-BF16 (Intel Sapphire Rapids and
    later); fp16: AVX512-FP16 or AMX-FP16. Elsewhere (e.g. AVX2 only) torch emulates them, reported tens
    of times slower than float32. float32 and float64 are always native."""
    if dtype in (torch.float32, torch.float64):
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if probe is None or not hasattr(torch.ops.mkldnn, probe):
        return False
    return bool(getattr(torch.ops.mkldnn, probe)())


def cpu_precision_report() -> str:
    """One line for `python -m imse_kernels`: which low-precision dtypes this CPU runs natively."""
    parts = [f"{name} {'native' if cpu_native_dtype(dt) else 'NOT native (emulated, many times slower than fp32)'}"
             for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))]
    return "; ".join(parts) + f" (oneDNN {'available' if torch.backends.mkldnn.is_available() else 'unavailable'})"


def _as_dtype(amp) -> Optional[torch.dtype]:
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp not in _AMP_NAMES:
        raise ValueError(f"autocast dtype must be one of {sorted(_AMP_NAMES)} or a torch.dtype, got {amp!r}")
    return _AMP_NAMES[amp]


def slow_autocast_reason(device, amp) -> Optional[str]:
    """Why autocast in `amp` on `device` would be slow, or None when it is fine (or not on the CPU)."""
    dtype = _as_dtype(amp)
    if dtype is None or torch.device(device).type != "cpu" or cpu_native_dtype(dtype):
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    need = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
    return (f"this CPU has no native {name} ({need}; torch.ops.mkldnn reports no support), so {name} matmuls are "
            f"emulated and run many times slower than float32")


def check_autocast(device, amp) -> None:
    """Refuse CPU autocast in a dtype this CPU runs only by emulation (docs/design.md §14).

    Raises `SlowAutocastError` (a ValueError) naming the reason and the two ways out: run in float32, or
    set IMSE_ALLOW_SLOW_AUTOCAST=1 to run anyway (then it warns once). A no-op for float32, for devices
    other than the CPU, and on CPUs with native support (AVX512-BF16/AMX for bf16)."""
    reason = slow_autocast_reason(device, amp)
    if reason is None:
        return
    if os.environ.get(ALLOW_SLOW_ENV) == "1":
        warn_slow_autocast(device, amp)
        return
    raise SlowAutocastError(f"autocast {amp} on the CPU refused: {reason}. Run in float32 (drop --amp / the "
                            f"autocast), or set {ALLOW_SLOW_ENV}=1 to run it anyway.")


def warn_slow_autocast(device, amp) -> None:
    """Warn once per process and dtype when autocast in `amp` runs on a CPU without native support
    (the spectral op calls this under CPU autocast, so a slow run is never silent)."""
    dtype = _as_dtype(amp)
    if dtype in _checked or torch.device(device).type != "cpu":
        return
    _checked.add(dtype)
    reason = slow_autocast_reason(device, dtype)
    if reason is not None:
        warnings.warn(f"imse_kernels: CPU autocast in {dtype}: {reason} (docs/design.md §14)", RuntimeWarning,
                      stacklevel=3)


def cpu_bf16_attention_is_slow() -> bool:
    """True on a CPU with native bf16 but without AMX (e.g. AMD Zen 4, Intel Cooper Lake): there torch's CPU
    flash attention runs slower in bf16 than in fp32 (measured on Zen 4, forward + backward: 5x at 17 tokens,
    1.3x at 197; docs/design.md §14), so attention is better left in fp32 under bf16 autocast."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return cpu_native_dtype(torch.bfloat16) and not (amx is not None and amx())


class Float32Attention(TorchFunctionMode):
    """Inside it, `F.scaled_dot_product_attention` on low-precision CPU tensors runs in float32 with autocast off
    and returns its output in the inputs' dtype; every other call is untouched (timm's ViTs call SDPA directly)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "cpu" \
                and args[0].dtype in (torch.bfloat16, torch.float16):
            dtype = args[0].dtype
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*up, **kw).to(dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def autocast(device, amp, attention: str = "auto") -> Iterator[None]:
    """`torch.autocast` for `device` in `amp` ("bf16", "fp16", a dtype, or None: no autocast) with this
    library's CPU policy (docs/design.md §14): refused on a CPU that only emulates the dtype (`check_autocast`),
    and `attention` "auto" keeps scaled-dot-product attention in fp32 where bf16 attention is the slower one
    (`cpu_bf16_attention_is_slow`: native bf16 without AMX); "fp32" always, "autocast" never.

        with imse_kernels.precision.autocast("cpu", "bf16"):
            logits = adapter(x)
    """
    if attention not in ("auto", "fp32", "autocast"):
        raise ValueError(f"autocast: attention must be 'auto', 'fp32' or 'autocast', got {attention!r}")
    dtype = _as_dtype(amp)
    if dtype is None:
        yield
        return
    device = torch.device(device)
    check_autocast(device, dtype)
    fp32_attention = device.type == "cpu" and (
        attention == "fp32" or (attention == "auto" and dtype == torch.bfloat16 and cpu_bf16_attention_is_slow()))
    with torch.autocast(device.type, dtype=dtype), (Float32Attention() if fp32_attention else contextlib.nullcontext()):
        yield
