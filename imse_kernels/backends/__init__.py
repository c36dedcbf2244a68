"""Backend registry and selection.

`IMSE_BACKEND=auto|torch|cpu|triton|cuda` (environment) or `use_backend(name)` (context manager,
takes precedence) choose the backend. `auto` picks the fastest one available for the tensor's
device and falls back to `torch`; an explicitly requested backend that is unknown, unavailable or
unable to run on the tensor's device raises.
"""
import contextlib
import importlib
import os
from typing import Iterator, Optional

import torch

from .base import SpectralBackend
from .torch_backend import TorchBackend

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
_MODULES = {"cpu": ("cpu_backend", "CpuBackend"), "triton": ("triton_backend", "TritonBackend"), "cuda": ("cuda_backend", "CudaBackend")}
# auto's preference per device type: Triton is the GPU default (it times its variants against cuBLAS per shape).
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}

_instances: dict[str, SpectralBackend] = {"torch": TorchBackend()}
_import_errors: dict[str, str] = {}
_override: list[str] = []


def _instance(name: str) -> Optional[SpectralBackend]:
    if name not in _instances and name not in _import_errors:
        module, cls = _MODULES[name]
        try:
            _instances[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
        except ImportError as exc:
            _import_errors[name] = f"cannot import: {exc}"
    return _instances.get(name)


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"imse_kernels: unknown backend {name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}")
    return name


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend `name` can run on this machine, else the reason it cannot."""
    name = _check_name(name)
    backend = _instance(name)
    if backend is None:
        return _import_errors[name]
    return backend.unavailable_reason()


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    return [n for n in BACKEND_NAMES if unavailable_reason(n) is None]


def backend_status() -> dict[str, Optional[str]]:
    """Every backend name mapped to None (available) or the reason it is not."""
    return {n: unavailable_reason(n) for n in BACKEND_NAMES}


def get_backend(name: str) -> SpectralBackend:
    """The backend called `name`; raises if it is unknown or unavailable."""
    name = _check_name(name)
    if name == "auto":
        raise ValueError("get_backend needs a concrete backend name; use resolve_backend for auto")
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"imse_kernels: backend {name!r} is unavailable: {reason}")
    return _instances[name]


def requested_backend() -> str:
    """The backend name in force: the innermost `use_backend`, else $IMSE_BACKEND, else 'auto'."""
    if _override:
        return _override[-1]
    return _check_name(os.environ.get("IMSE_BACKEND", "auto") or "auto")


def resolve_backend(device: torch.device) -> SpectralBackend:
    """The backend that runs a call on `device` under the current selection."""
    name = requested_backend()
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(candidate) is None and _instances[candidate].supports(device):
                return _instances[candidate]
        return _instances["torch"]
    backend = get_backend(name)
    if not backend.supports(device):
        raise RuntimeError(f"imse_kernels: backend {name!r} cannot run on device {device}")
    return backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed spectral ops on backend `name` ('auto' restores automatic choice)."""
    name = _check_name(name)
    if name != "auto":
        get_backend(name)  # fail at entry, not at the first op
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()
