"""`auto` on a device with unverified backends: a chain that falls back instead of failing a forward.

The GPU backends (triton, cuda) have been compiled and tested on the CPU only, so under `auto` their
first call of each primitive and shape is guarded (docs/design.md, section 5): it runs inside a
`try`, and its result is checked once against the torch backend. A compile, launch or resource
error, or a wrong result, warns once and disables that backend for `auto` for the rest of the
process; the call is then served by the next backend of the chain (triton -> cuda -> torch), so it
still returns the right result. Later calls of a verified shape run unguarded. An explicitly
requested backend (`use_backend`, `IMSE_BACKEND`) never comes here: it raises its own errors.
"""
import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..precision import tf32_matmul_enabled
from .base import SpectralBackend

PRIMITIVES = ("factorized_forward", "recompose", "factorized_backward", "factorized_input_grad",
              "recomposed_backward", "indexed_forward", "indexed_backward", "indexed_input_grad")

# One-time result check: max |out - torch| <= tol * max |torch|, per output tensor.
_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-10}
_FP32_TOLERANCE = {True: 2e-2, False: 2e-4}  # keyed by TF32 on

_lock = threading.Lock()
_disabled: dict[str, str] = {}   # backend name -> why auto no longer uses it
_verified: set[tuple] = set()    # (backend, primitive, signature) whose first call passed


class BackendCheckError(RuntimeError):
    """A backend's result differed from the torch backend's on its first call of a shape."""


def disabled_backends() -> dict[str, str]:
    """Backends that `auto` stopped using in this process, with the reason."""
    with _lock:
        return dict(_disabled)


def reset() -> None:
    """Forget every failure and verification (tests; a fixed driver)."""
    with _lock:
        _disabled.clear()
        _verified.clear()


def _signature(args: tuple) -> tuple:
    """Shapes, dtypes, devices and flags of a call, plus the TF32 setting when an operand is fp32."""
    sig = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else a for a in args)
    if any(isinstance(a, Tensor) and a.dtype == torch.float32 for a in args):
        sig += (tf32_matmul_enabled(),)
    return sig


def _tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return _FP32_TOLERANCE[tf32_matmul_enabled()]
    return _TOLERANCE.get(dtype, 6e-2)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check_result(out, ref, dtype: torch.dtype) -> None:
    """Raise `BackendCheckError` unless every output of `out` matches `ref` within the dtype's tolerance."""
    outs, refs = _as_tuple(out), _as_tuple(ref)
    if len(outs) != len(refs):
        raise BackendCheckError(f"returned {len(outs)} outputs, the torch backend {len(refs)}")
    tol = _tolerance(dtype)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if r is None or o is None:
            if (r is None) != (o is None):
                raise BackendCheckError(f"output {i} is {'missing' if o is None else 'unexpected'}")
            continue
        if tuple(o.shape) != tuple(r.shape):
            raise BackendCheckError(f"output {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        o64, r64 = o.detach().double(), r.detach().double()
        if not bool(torch.isfinite(o64).all()) and bool(torch.isfinite(r64).all()):
            raise BackendCheckError(f"output {i} holds non-finite values where the torch backend's does not")
        err = float((o64 - r64).abs().max())
        scale = float(r64.abs().max())
        if not err <= tol * max(scale, 1e-30):
            raise BackendCheckError(f"output {i} is off by {err:.3g} (relative {err / max(scale, 1e-30):.3g}, "
                                    f"tolerance {tol:g} for {dtype})")


def _describe(args: tuple) -> str:
    return ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in args if isinstance(a, Tensor))


class FallbackChain(SpectralBackend):
    """The backends of `names`, tried in order; those in `guarded` are checked at first use."""

    def __init__(self, names: tuple[str, ...], lookup: Callable[[str], Optional[SpectralBackend]],
                 guarded: frozenset[str], reference: SpectralBackend) -> None:
        self.names, self._lookup, self._guarded, self._reference = names, lookup, guarded, reference
        self.name = "auto(" + ">".join(names) + ")"
        self._route_timing_failed = False

    def supports(self, device: torch.device) -> bool:
        return True

    def serving(self, device: torch.device) -> SpectralBackend:
        """The backend that currently serves calls on `device` (the first one not disabled)."""
        for name in self.names:
            backend = self._lookup(name)
            if backend is not None and name not in _disabled and backend.supports(device):
                return backend
        return self._reference

    def _call(self, primitive: str, args: tuple):
        device = next(a.device for a in args if isinstance(a, Tensor))
        for name in self.names:
            backend = self._lookup(name)
            if backend is None or name in _disabled or not backend.supports(device):
                continue
            fn = getattr(backend, primitive)
            if name not in self._guarded:
                return fn(*args)
            key = (name, primitive, _signature(args))
            if key in _verified or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                return fn(*args)
            try:
                out = fn(*args)
                check_result(out, getattr(self._reference, primitive)(*args), _result_dtype(args))
            except Exception as exc:  # noqa: BLE001 - any failure of an unverified kernel means: fall back
                self._disable(name, primitive, args, exc)
                continue
            with _lock:
                _verified.add(key)
            return out
        return getattr(self._reference, primitive)(*args)

    def _disable(self, name: str, primitive: str, args: tuple, exc: Exception) -> None:
        reason = f"{primitive}({_describe(args)}) failed at first use: {type(exc).__name__}: {exc}"
        with _lock:
            first = name not in _disabled
            _disabled[name] = reason
        if first:
            warnings.warn(
                f"imse_kernels: the {name} backend is disabled for 'auto' in this process: {reason}. "
                f"The next backend serves instead, with correct results. To see the error raised, "
                f"select it explicitly (IMSE_BACKEND={name} or imse_kernels.use_backend({name!r})).",
                RuntimeWarning, stacklevel=4)

    def factorized_forward(self, x, U, s, Vh, bias, save_h):
        return self._call("factorized_forward", (x, U, s, Vh, bias, save_h))

    def recompose(self, U, s, Vh):
        return self._call("recompose", (U, s, Vh))

    def factorized_backward(self, grad, h, U, s, Vh, need_dx):
        return self._call("factorized_backward", (grad, h, U, s, Vh, need_dx))

    def factorized_input_grad(self, grad, U, s, Vh):
        return self._call("factorized_input_grad", (grad, U, s, Vh))

    def recomposed_backward(self, grad, x, U, s, Vh, W, need_dx):
        return self._call("recomposed_backward", (grad, x, U, s, Vh, W, need_dx))

    def indexed_forward(self, x, U, S, Vh, bias, index, save_h):
        return self._call("indexed_forward", (x, U, S, Vh, bias, index, save_h))

    def indexed_backward(self, grad, h, U, S, Vh, index, need_dx):
        return self._call("indexed_backward", (grad, h, U, S, Vh, index, need_dx))

    def indexed_input_grad(self, grad, U, S, Vh, index):
        return self._call("indexed_input_grad", (grad, U, S, Vh, index))

    def measured_route(self, n, d_in, d_out, r, need_ds, need_dx, has_weight, dtype, device):
        if self._route_timing_failed:
            return None
        try:
            return self.serving(device).measured_route(n, d_in, d_out, r, need_ds, need_dx, has_weight, dtype, device)
        except Exception as exc:  # noqa: BLE001 - route timing is an optimisation; the FLOP model decides instead
            self._route_timing_failed = True
            warnings.warn(f"imse_kernels: route timing failed ({type(exc).__name__}: {exc}); the FLOP model "
                          "chooses routes for the rest of the process", RuntimeWarning, stacklevel=2)
            return None


def _result_dtype(args: tuple) -> torch.dtype:
    """The dtype the outputs are compared in: that of the first operand (x, grad or U)."""
    return next(a.dtype for a in args if isinstance(a, Tensor))
