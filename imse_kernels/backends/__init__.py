"""Backend registry and selection.

`IMSE_BACKEND=auto|torch|cpu|triton|cuda` (environment) or `use_backend(name)` (context manager,
takes precedence, local to the thread and task) choose the backend. `auto` picks the fastest one
available for the tensor's device; on a GPU its unverified backends are guarded and fall back to the
next one (`fallback.FallbackChain`, docs/design.md section 5). An explicitly requested backend that
is unknown, unavailable or unable to run on the tensor's device raises, and so do its own errors.
"""
import contextlib
import importlib
import os
from typing import Iterator, Optional

import torch

from ..overrides import Override
from . import fallback
from .base import FACTORIZED, RECOMPOSED, SpectralBackend
from .fallback import disabled_backends
from .torch_backend import TorchBackend

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
_MODULES = {"cpu": ("compiled_backend", "CpuBackend"), "triton": ("triton_backend", "TritonBackend"),
            "cuda": ("compiled_backend", "CudaBackend")}
# auto's preference per device type: the first usable one serves.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
# Backends not yet verified on real hardware: under auto, checked at first use of each shape.
GUARDED = frozenset({"triton", "cuda"})

_instances: dict[str, SpectralBackend] = {"torch": TorchBackend()}
_import_errors: dict[str, str] = {}
_override = Override("backend")
_chains: dict[tuple, fallback.FallbackChain] = {}


def _instance(name: str) -> Optional[SpectralBackend]:
    if name not in _instances and name not in _import_errors:
        module, cls = _MODULES[name]
        try:
            _instances[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
        except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break the import
            _import_errors[name] = f"cannot import: {type(exc).__name__}: {exc}"
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
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("IMSE_BACKEND", "auto") or "auto")


def _usable(name: str) -> Optional[SpectralBackend]:
    return _instances[name] if unavailable_reason(name) is None else None


def _auto(device: torch.device) -> SpectralBackend:
    order = _AUTO_ORDER.get(device.type, ("torch",))
    if GUARDED.isdisjoint(order):
        for candidate in order:
            backend = _usable(candidate)
            if backend is not None and backend.supports(device):
                return backend
        return _instances["torch"]
    chain = _chains.get(order)
    if chain is None:
        chain = _chains[order] = fallback.FallbackChain(order, _usable, GUARDED, _instances["torch"])
    return chain


def resolve_backend(device: torch.device) -> SpectralBackend:
    """The backend that runs a call on `device` under the current selection."""
    name = requested_backend()
    if name == "auto":
        return _auto(device)
    backend = get_backend(name)
    if not backend.supports(device):
        raise RuntimeError(f"imse_kernels: backend {name!r} cannot run on device {device}")
    return backend


def serving_backend(device: torch.device) -> str:
    """The name of the backend that actually runs calls on `device` now (auto resolved, fallbacks applied)."""
    backend = resolve_backend(device)
    if isinstance(backend, fallback.FallbackChain):
        backend = backend.serving(device)
    return backend.name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed spectral ops on backend `name` ('auto' restores automatic choice)."""
    name = _check_name(name)
    if name != "auto":
        get_backend(name)  # fail at entry, not at the first op
    with _override.set(name):
        yield


__all__ = ["BACKEND_NAMES", "FACTORIZED", "RECOMPOSED", "SpectralBackend", "available_backends", "backend_status",
           "disabled_backends", "get_backend", "requested_backend", "resolve_backend", "serving_backend",
           "unavailable_reason", "use_backend"]
