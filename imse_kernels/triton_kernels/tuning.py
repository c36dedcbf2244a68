"""Per-shape choice among equivalent implementations, by measured time on the GPU, cached.

A primitive offers candidates (variant × tile configuration, e.g. "fused/m64_n128_..." or
"split/..." or "blas"), each a zero-argument callable writing fresh outputs. Without timing the
shape rule's `default` runs. Timing is opt-in (`IMSE_TRITON_TUNE=1`): it costs seconds per new
shape, which must not land inside a user's first forward unasked. With it, the first call for a
shape key times every candidate (`triton.testing.do_bench`) and remembers the fastest. The key
buckets N to the next power of two, so a ViT batch of any size tunes once per layer shape. Choices
persist in a JSON file, `IMSE_TRITON_CACHE` or `~/.cache/imse_kernels/triton_tuning.json`, read at
first use and rewritten atomically after each new choice, so a later process times nothing.

Why not `triton.autotune`: it times only configurations of one kernel, while a choice here is among
different kernels and cuBLAS ("fused" chain, "split" GEMM + cuBLAS, "blas"), keyed by bucketed N,
and it would time inside every new process and during CUDA graph capture.

Timing is never done in the interpreter or while a CUDA graph is being captured.
"""
import contextlib
import json
import os
import threading
from typing import Callable, Iterator, Optional

import torch

from ..overrides import Override
from ..state_file import atomic_write_text
from . import runtime

_lock = threading.Lock()
_choices: dict[str, str] = {}
_loaded = False


def bucket(n: int) -> int:
    """N rounded up to a power of two (1, 2, 4, ...)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def enabled(device: torch.device) -> bool:
    if runtime.INTERPRETED or device.type != "cuda":
        return False
    if os.environ.get("IMSE_TRITON_TUNE", "0").strip().lower() not in ("1", "true", "yes", "on"):
        return False
    return not torch.cuda.is_current_stream_capturing()


def _path() -> Optional[str]:
    if os.environ.get("IMSE_TRITON_CACHE"):
        return os.environ["IMSE_TRITON_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imse_kernels", "triton_tuning.json")


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    path = _path()
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                _choices.update({str(k): str(v) for k, v in json.load(f).items()})
        except (OSError, ValueError):
            pass  # an unreadable cache only costs a re-tune


def _save() -> None:
    path = _path()
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, json.dumps(_choices, indent=0, sort_keys=True))
    except OSError:
        pass  # an unwritable cache only costs a re-tune in the next process


def choices() -> dict[str, str]:
    """A copy of the cached choices (key -> candidate name)."""
    with _lock:
        _load()
        return dict(_choices)


def clear() -> None:
    with _lock:
        _choices.clear()


_forced = Override("triton_variant")


@contextlib.contextmanager
def force(variant: str) -> Iterator[None]:
    """Run only candidates of `variant` ("fused", "split", "triton" or "blas") inside the block
    (tests and benchmarks); `IMSE_TRITON_VARIANT` does the same process-wide."""
    with _forced.set(variant):
        yield


def forced() -> Optional[str]:
    variant = _forced.get()
    if variant is not None:
        return variant
    return os.environ.get("IMSE_TRITON_VARIANT", "").strip().lower() or None


def restrict(candidates: dict, default: str) -> tuple[dict, str]:
    """Candidates and default narrowed to the forced variant, if one is forced and offered."""
    variant = forced()
    if variant is None:
        return candidates, default
    kept = {n: f for n, f in candidates.items() if n.split("/")[0] == variant}
    if not kept:
        return candidates, default
    if default not in kept:
        default = next(iter(kept))
    return kept, default


def choose(key: str, device: torch.device, candidates: dict[str, Callable[[], object]], default: str) -> str:
    """The name of the candidate to run for `key`: cached, else timed now (on CUDA), else `default`."""
    if default not in candidates:
        raise KeyError(f"tuning: default {default!r} is not a candidate of {key}")
    candidates, default = restrict(candidates, default)
    if forced() is not None:
        key = f"{key}|only={forced()}"
    with _lock:
        _load()
        cached = _choices.get(key)
    if cached in candidates:
        return cached
    if not enabled(device) or len(candidates) == 1:
        return default
    from triton.testing import do_bench

    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = do_bench(fn, warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - too much shared memory, a compile error: not a candidate here
            continue
    best = min(times, key=times.get) if times else default
    with _lock:
        _choices[key] = best
        _save()
    return best
