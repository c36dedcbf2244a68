"""`auto` on a device with unverified backends: a chain that falls back instead of failing a forward.

The GPU backends (triton, cuda) have been compiled and tested on the CPU only, so under `auto` their
first call of each primitive and signature is guarded (docs/design.md, section 5). What it promises,
exactly:

- Survived, with the right result: an exception raised by the backend at its first use of a
  signature (compile, launch or resource error, an asynchronous fault that leaves the CUDA context
  usable), or a result that differs from the torch backend's beyond the dtype's bound, or non-finite
  values at other positions than the torch backend's. The backend warns once, is disabled for `auto`
  for the rest of the process, and the next backend of the chain (triton -> cuda -> torch) serves.
- Not survived, but diagnosed and remembered: a fault that poisons the CUDA context (an illegal
  address, a device-side assert: every later CUDA call of the process fails, the torch backend's
  too). The call raises `CudaContextLost` naming the backend; the backend is recorded in a file
  (`IMSE_BACKEND_FAULTS`, default ~/.cache/imse_kernels/backend_faults.json) per GPU, driver, torch,
  triton and code fingerprint, so `auto` skips it in the next process on that machine.
- Not caught at all: a kernel that hangs; a wrong result in a signature already verified (the check
  runs once per signature); a failure of the torch reference itself (for example out of memory),
  which propagates as it is and blames no backend.

The signature is the shapes, strides, storage offsets, 16-byte alignment, dtypes and devices of the
tensors, the flags, and the TF32 setting when an operand is fp32: what selects a Triton
specialisation or a CUDA code path. An explicitly requested backend (`use_backend`, `IMSE_BACKEND`)
never comes here: it raises its own errors.
"""
import ctypes
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..precision import tf32_matmul_enabled
from ..state_file import atomic_write_text
from .base import SpectralBackend

PRIMITIVES = ("factorized_forward", "recompose", "factorized_backward", "factorized_input_grad",
              "recomposed_backward", "indexed_forward", "indexed_backward", "indexed_input_grad")

# One-time result check: max |out - ref| <= tol * max |ref| over the entries finite in both.
# 16-bit dtypes, with u the dtype's unit roundoff (bf16 2^-8, fp16 2^-11; accumulation in fp32): each
# result carries one rounding of the output (<= u |y|) and the roundings of its intermediates (the
# torch backend rounds h and U ⊙ s, a fused kernel mid ⊙ s), whose errors of random sign summed over
# the rank add about u/sqrt(3) each relative to the largest output; the fp32 sums add <= K 2^-24 (2e-4
# at K = 3072). Two results so made differ by at most about 4u; the bound is 5u: bf16 1.95e-2,
# fp16 2.44e-3. A bound on typical data, not a worst case: a false alarm costs speed, never correctness.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
ROUNDINGS = 5
_TOLERANCE = {dtype: ROUNDINGS * u for dtype, u in UNIT_ROUNDOFF.items()} | {torch.float64: 1e-10}
_FP32_TOLERANCE = {True: 2e-2, False: 2e-4}  # keyed by TF32 on

_lock = threading.Lock()
_disabled: dict[str, str] = {}   # backend name -> why auto no longer uses it
_verified: set[tuple] = set()    # (backend, primitive, signature) whose first call passed
_faults_loaded: set[str] = set()  # devices whose recorded faults are merged into _disabled


class BackendCheckError(RuntimeError):
    """A backend's result differed from the torch backend's on its first call of a signature."""


class CudaContextLost(RuntimeError):
    """A backend's first call left the device unusable for this process (a sticky CUDA fault)."""


def disabled_backends() -> dict[str, str]:
    """Backends that `auto` stopped using in this process, with the reason."""
    with _lock:
        return dict(_disabled)


def reset() -> None:
    """Forget every failure and verification of this process (tests; a fixed driver). The faults
    recorded on disk are read again at the next call; `forget_faults` removes them."""
    with _lock:
        _disabled.clear()
        _verified.clear()
        _faults_loaded.clear()


# ------------------------------------------------------------------------------------------------
# Signatures and the result check

def _tensor_signature(t: Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.data_ptr() % 16 == 0, t.dtype, t.device)


def _signature(args: tuple) -> tuple:
    """Per tensor: shape, strides, storage offset, 16-byte alignment, dtype, device; the flags as they
    are; the TF32 setting when an operand is fp32."""
    sig = tuple(_tensor_signature(a) if isinstance(a, Tensor) else a for a in args)
    if any(isinstance(a, Tensor) and a.dtype == torch.float32 for a in args):
        sig += (tf32_matmul_enabled(),)
    return sig


def tolerance(dtype: torch.dtype) -> float:
    """The one-time check's bound on max |out - ref| / max |ref| for operands of `dtype`."""
    if dtype == torch.float32:
        return _FP32_TOLERANCE[tf32_matmul_enabled()]
    return _TOLERANCE.get(dtype, ROUNDINGS * 2.0 ** -8)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check_result(out, ref, dtype: torch.dtype) -> None:
    """Raise `BackendCheckError` unless every output of `out` matches `ref`: the same shapes, NaN and
    inf at the same positions, and within the dtype's bound where both are finite."""
    outs, refs = _as_tuple(out), _as_tuple(ref)
    if len(outs) != len(refs):
        raise BackendCheckError(f"returned {len(outs)} outputs, the torch backend {len(refs)}")
    tol = tolerance(dtype)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if r is None or o is None:
            if (r is None) != (o is None):
                raise BackendCheckError(f"output {i} is {'missing' if o is None else 'unexpected'}")
            continue
        if tuple(o.shape) != tuple(r.shape):
            raise BackendCheckError(f"output {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        o64, r64 = o.detach().double(), r.detach().double().to(o.device)
        for what, test in (("NaN", torch.isnan), ("inf", torch.isinf)):
            differ = int((test(o64) != test(r64)).sum())
            if differ:
                raise BackendCheckError(f"output {i} has {what} at {differ} positions where the torch backend's "
                                        f"has none, or none where it has")
        finite = torch.isfinite(r64)
        if not bool(finite.any()):
            continue
        err = float((o64 - r64)[finite].abs().max())
        scale = float(r64[finite].abs().max())
        if not err <= tol * max(scale, 1e-30):
            raise BackendCheckError(f"output {i} is off by {err:.3g} (relative {err / max(scale, 1e-30):.3g}, "
                                    f"tolerance {tol:.3g} for {dtype})")


def _describe(args: tuple) -> str:
    return ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in args if isinstance(a, Tensor))


# ------------------------------------------------------------------------------------------------
# Faults that poison the context: recorded on disk per machine

def faults_path() -> Path:
    """Where poisoning faults are recorded: $IMSE_BACKEND_FAULTS, else the user's cache folder."""
    if os.environ.get("IMSE_BACKEND_FAULTS"):
        return Path(os.environ["IMSE_BACKEND_FAULTS"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imse_kernels" / "backend_faults.json"


def _driver_version() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().split("Kernel Module")[-1].split()[0]
    except (OSError, IndexError):
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-api-{version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


_FINGERPRINT: list[str] = []


def _code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the GPU backends' code: their Python sources, the Triton kernels and
    the CUDA extension, so a changed kernel is tried again."""
    if not _FINGERPRINT:
        package = Path(__file__).resolve().parents[1]
        files = sorted([*package.glob("backends/*.py"), *package.glob("triton_kernels/*.py"),
                        *package.glob("_C_cuda*.so"), *package.glob("_C_cuda*.pyd")])
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
        _FINGERPRINT.append(digest.hexdigest()[:16])
    return _FINGERPRINT[0]


def machine_key(device: torch.device) -> str:
    """GPU, driver, torch, triton and code fingerprint: what a recorded fault is valid for."""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        driver = _driver_version()
    else:
        gpu, driver = device.type, "none"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"{gpu}|driver {driver}|torch {torch.__version__}|triton {triton_version}|code {_code_fingerprint()}"


def _read_faults() -> dict:
    try:
        data = json.loads(faults_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none recorded, or an unreadable file: nothing is skipped


def _record_fault(device: torch.device, name: str, reason: str) -> Optional[Path]:
    path = faults_path()
    data = _read_faults()
    data.setdefault(machine_key(device), {})[name] = reason
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        return None
    return path


def _load_faults(device: torch.device) -> None:
    """Merge the faults recorded for this machine into the disabled set (once per device and process)."""
    if str(device) in _faults_loaded:
        return
    recorded = _read_faults().get(machine_key(device), {})
    with _lock:
        _faults_loaded.add(str(device))
        for name, reason in recorded.items():
            _disabled.setdefault(name, f"faulted in an earlier process on this machine (recorded in {faults_path()}): "
                                       f"{reason}")


def forget_faults() -> None:
    """Remove every recorded fault (after a driver or code fix), and this process's verdicts."""
    try:
        faults_path().unlink()
    except FileNotFoundError:
        pass
    reset()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# The chain

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
        _load_faults(device)
        for name in self.names:
            backend = self._lookup(name)
            if backend is not None and name not in _disabled and backend.supports(device):
                return backend
        return self._reference

    def _call(self, primitive: str, args: tuple):
        device = next(a.device for a in args if isinstance(a, Tensor))
        _load_faults(device)
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
                _synchronize(device)  # an asynchronous fault of this kernel surfaces here, in its own try
            except Exception as exc:  # noqa: BLE001 - any failure of an unverified kernel means: fall back
                if not self._context_usable(device):
                    self._lost(device, name, primitive, args, exc)
                self._disable(name, primitive, args, exc)
                continue
            try:
                ref = getattr(self._reference, primitive)(*args)
            except Exception as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"imse_kernels: raised by the torch backend while checking the {name} backend's first "
                                 f"{primitive}; the {name} backend is not blamed")
                raise  # the reference's own failure (out of memory, say) is not the backend's
            try:
                check_result(out, ref, _result_dtype(args))
            except BackendCheckError as exc:
                self._disable(name, primitive, args, exc)
                continue
            with _lock:
                _verified.add(key)
            return out
        return getattr(self._reference, primitive)(*args)

    def _context_usable(self, device: torch.device) -> bool:
        """Whether the device still runs work after a failure: a tiny torch-backend call and a sync."""
        try:
            one = torch.ones(1, 1, device=device)
            self._reference.recompose(one, torch.ones(1, device=device), one)
            _synchronize(device)
            return True
        except Exception:  # noqa: BLE001 - any failure here means the context is gone
            return False

    def _lost(self, device: torch.device, name: str, primitive: str, args: tuple, exc: Exception):
        reason = f"{primitive}({_describe(args)}) at first use: {type(exc).__name__}: {exc}"
        with _lock:
            _disabled[name] = f"poisoned the device context: {reason}"
        path = _record_fault(device, name, reason)
        where = (f"it is recorded in {path}, so 'auto' skips it in the next process on this GPU, driver and code "
                 f"(imse_kernels.backends.fallback.forget_faults() or deleting the file tries it again)"
                 if path else f"recording it in {faults_path()} failed, so set IMSE_BACKEND to another backend")
        raise CudaContextLost(
            f"imse_kernels: the {name} backend's {reason}; after it the device no longer runs any work in this "
            f"process (the torch backend's calls fail too), so no backend can complete this call. Restart the "
            f"process: {where}.") from exc

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
