"""Loads the compiled extensions, once, and remembers why one is missing.

A missing extension, or one built against another torch, never breaks `import imse_kernels`:
it warns once and the `torch` backend serves instead.
"""
import importlib
import warnings

import torch

_status: dict[str, str | None] = {}  # module name -> None when loaded, else the reason it is not


def _build_torch_version():
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info.TORCH_VERSION


def load(name: str) -> bool:
    """Import `imse_kernels.<name>` (which registers its ops); True when it is usable."""
    if name in _status:
        return _status[name] is None
    built = _build_torch_version()
    if built is None:
        reason = "the package was installed without compiled extensions (IMSE_NO_EXTENSION or a source checkout)"
    elif built != torch.__version__:
        reason = f"compiled against torch {built}, running torch {torch.__version__}; reinstall imse_kernels"
    else:
        try:
            importlib.import_module(f"imse_kernels.{name}")
            reason = None
        except (ImportError, OSError) as exc:
            reason = f"failed to load: {exc}"
    _status[name] = reason
    if reason is not None and name == "_C":
        warnings.warn(f"imse_kernels: C++ extension unavailable ({reason}); using the torch backend", stacklevel=3)
    return reason is None


def reason(name: str) -> str | None:
    load(name)
    return _status[name]
