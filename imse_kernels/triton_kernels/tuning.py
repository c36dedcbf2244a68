"""Tile configurations and the per-shape choice among equivalent implementations, by measured time
on the GPU, cached.

Configurations: a `Config` is a kernel's BLOCK_* / GROUP_M meta-parameters plus the launch options
`num_warps` and `num_stages`, with a stable `name` (so choices can be cached on disk). Each kernel has
candidates per architecture, one default used when timing is off, and one small configuration for
the interpreter.

Choice: a primitive offers candidates (variant × tile configuration, e.g. "fused/m64_n128_..." or
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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from ..overrides import Override
from ..state_file import atomic_write_text
from . import runtime


@dataclass(frozen=True)
class Config:
    meta: tuple  # ((name, value), ...) sorted
    num_warps: int = 4
    num_stages: int = 3
    name: str = field(init=False, compare=False)

    def __post_init__(self):
        tag = "_".join(f"{k.replace('BLOCK_', '').lower()}{v}" for k, v in self.meta)
        object.__setattr__(self, "name", f"{tag}_w{self.num_warps}s{self.num_stages}")

    @property
    def kwargs(self) -> dict:
        return dict(self.meta)

    def __getitem__(self, key):
        return dict(self.meta)[key]

    def for_fp32(self) -> "Config":
        """The same tile with half the reduction depth: fp32 tiles then take the bytes the
        16-bit tiles take, so a configuration that fits shared memory in bf16 fits in fp32."""
        reduce_key = "BLOCK_O" if "BLOCK_O" in dict(self.meta) else "BLOCK_K"
        meta = {**dict(self.meta), reduce_key: max(16, dict(self.meta)[reduce_key] // 2)}
        return Config(tuple(sorted(meta.items())), self.num_warps, self.num_stages)


def make(num_warps: int = 4, num_stages: int = 3, **meta) -> Config:
    return Config(tuple(sorted(meta.items())), num_warps, num_stages)


def _chain(bm, bn, br, bk, w, st):
    return make(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk, GROUP_M=8)


def _mm(bm, bn, bk, w, st):
    return make(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)


def _rds(br, bi, bo, w, st):
    return make(w, st, BLOCK_R=br, BLOCK_I=bi, BLOCK_O=bo)


# Candidates per kernel and architecture (sm_80 = A100 class, 164 KiB shared memory;
# sm_90 = H100/H200, 228 KiB). Chain tiles hold two fp32 accumulators (BM×BN and BM×BR).
CANDIDATES = {
    "chain": {
        80: [_chain(16, 64, 32, 64, 4, 3), _chain(64, 64, 64, 32, 4, 3), _chain(64, 128, 64, 32, 4, 3),
             _chain(128, 128, 64, 32, 8, 3)],
        90: [_chain(16, 64, 64, 64, 4, 3), _chain(64, 64, 64, 64, 4, 3), _chain(64, 128, 64, 64, 4, 3),
             _chain(128, 128, 64, 64, 8, 3), _chain(128, 256, 64, 64, 8, 3)],
    },
    "scaled_matmul": {
        80: [_mm(64, 64, 32, 4, 4), _mm(128, 128, 32, 4, 4), _mm(128, 256, 32, 8, 3), _mm(256, 128, 32, 8, 3)],
        90: [_mm(64, 64, 64, 4, 4), _mm(128, 128, 64, 8, 4), _mm(128, 256, 64, 8, 3), _mm(256, 128, 64, 8, 3)],
    },
    "recomposed_ds": {
        80: [_rds(64, 64, 32, 4, 3), _rds(128, 64, 32, 4, 3), _rds(128, 128, 32, 8, 3)],
        90: [_rds(64, 64, 64, 4, 3), _rds(128, 64, 64, 4, 3), _rds(128, 128, 64, 8, 3)],
    },
}

INTERPRETER = {
    "chain": _chain(16, 16, 16, 16, 4, 1),
    "scaled_matmul": _mm(16, 16, 16, 4, 1),
    "recomposed_ds": _rds(16, 16, 16, 4, 1),
}


# Configurations that `tools/triton_compile_check.py`, lowering them as the JIT will, found spilling more
# than its limit or over a per-block limit on sm_80 or sm_90 under triton 3.6 or 3.8 (tables in
# benchmarks/results/triton_compile_check_*): removed from the candidates, so neither the tuner nor a
# default ever launches them. Keyed by (kernel, arch key, operands: "16bit", "fp32" IEEE dots or
# "tf32", use: "plain" or "codes", the per-sample-code launches of `chain`, layout: "aligned" as the
# ViT shapes are or "unaligned", see runtime.aligned), values are configuration names.
DROPPED: dict[tuple[str, int, str, str, str], frozenset[str]] = {
    ('chain', 80, '16bit', 'codes', 'aligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, '16bit', 'codes', 'unaligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, '16bit', 'plain', 'unaligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'fp32', 'codes', 'aligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'fp32', 'codes', 'unaligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
        "k32_m16_n64_r32_group_m8_w4s3",
    }),
    ('chain', 80, 'fp32', 'plain', 'aligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'fp32', 'plain', 'unaligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'tf32', 'codes', 'aligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'tf32', 'codes', 'unaligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'tf32', 'plain', 'aligned'): frozenset({
        "k16_m64_n128_r64_group_m8_w4s3",
    }),
    ('chain', 80, 'tf32', 'plain', 'unaligned'): frozenset({
        "k16_m128_n128_r64_group_m8_w8s3", "k16_m64_n128_r64_group_m8_w4s3", "k16_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, '16bit', 'codes', 'aligned'): frozenset({
        "k64_m128_n128_r64_group_m8_w8s3", "k64_m128_n256_r64_group_m8_w8s3", "k64_m64_n128_r64_group_m8_w4s3",
    }),
    ('chain', 90, '16bit', 'codes', 'unaligned'): frozenset({
        "k64_m128_n128_r64_group_m8_w8s3", "k64_m128_n256_r64_group_m8_w8s3", "k64_m64_n128_r64_group_m8_w4s3",
        "k64_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, '16bit', 'plain', 'unaligned'): frozenset({
        "k64_m128_n128_r64_group_m8_w8s3", "k64_m128_n256_r64_group_m8_w8s3", "k64_m64_n128_r64_group_m8_w4s3",
        "k64_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'fp32', 'codes', 'aligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m16_n64_r64_group_m8_w4s3",
        "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'fp32', 'codes', 'unaligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m16_n64_r64_group_m8_w4s3",
        "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'fp32', 'plain', 'aligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m16_n64_r64_group_m8_w4s3",
        "k32_m64_n128_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'fp32', 'plain', 'unaligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m16_n64_r64_group_m8_w4s3",
        "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'tf32', 'codes', 'aligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m64_n128_r64_group_m8_w4s3",
        "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'tf32', 'codes', 'unaligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m16_n64_r64_group_m8_w4s3",
        "k32_m64_n128_r64_group_m8_w4s3", "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'tf32', 'plain', 'aligned'): frozenset({
        "k32_m128_n256_r64_group_m8_w8s3", "k32_m64_n128_r64_group_m8_w4s3",
    }),
    ('chain', 90, 'tf32', 'plain', 'unaligned'): frozenset({
        "k32_m128_n128_r64_group_m8_w8s3", "k32_m128_n256_r64_group_m8_w8s3", "k32_m64_n128_r64_group_m8_w4s3",
        "k32_m64_n64_r64_group_m8_w4s3",
    }),
    ('scaled_matmul', 80, '16bit', 'plain', 'unaligned'): frozenset({
        "k32_m128_n128_group_m8_w4s4", "k32_m128_n256_group_m8_w8s3", "k32_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 80, 'fp32', 'plain', 'aligned'): frozenset({
        "k16_m128_n128_group_m8_w4s4", "k16_m128_n256_group_m8_w8s3", "k16_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 80, 'fp32', 'plain', 'unaligned'): frozenset({
        "k16_m128_n128_group_m8_w4s4", "k16_m128_n256_group_m8_w8s3", "k16_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 80, 'tf32', 'plain', 'aligned'): frozenset({
        "k16_m128_n128_group_m8_w4s4", "k16_m128_n256_group_m8_w8s3", "k16_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 80, 'tf32', 'plain', 'unaligned'): frozenset({
        "k16_m128_n128_group_m8_w4s4", "k16_m128_n256_group_m8_w8s3", "k16_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 90, '16bit', 'plain', 'aligned'): frozenset({
        "k64_m128_n256_group_m8_w8s3",
    }),
    ('scaled_matmul', 90, '16bit', 'plain', 'unaligned'): frozenset({
        "k64_m128_n128_group_m8_w8s4", "k64_m128_n256_group_m8_w8s3", "k64_m256_n128_group_m8_w8s3",
        "k64_m64_n64_group_m8_w4s4",
    }),
    ('scaled_matmul', 90, 'fp32', 'plain', 'aligned'): frozenset({
        "k32_m128_n256_group_m8_w8s3", "k32_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 90, 'fp32', 'plain', 'unaligned'): frozenset({
        "k32_m128_n128_group_m8_w8s4", "k32_m128_n256_group_m8_w8s3", "k32_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 90, 'tf32', 'plain', 'aligned'): frozenset({
        "k32_m128_n256_group_m8_w8s3", "k32_m256_n128_group_m8_w8s3",
    }),
    ('scaled_matmul', 90, 'tf32', 'plain', 'unaligned'): frozenset({
        "k32_m128_n128_group_m8_w8s4", "k32_m128_n256_group_m8_w8s3", "k32_m256_n128_group_m8_w8s3",
    }),
}


def arch_key(capability: int) -> int:
    """The candidate table for a compute capability: sm_90 and newer use the Hopper table."""
    return 90 if capability >= 90 else 80


def operands(fp32: bool, precision: str = "ieee") -> str:
    """The operand class a configuration is checked for: "16bit", "fp32" (IEEE dots) or "tf32"."""
    return ("tf32" if precision == "tf32" else "fp32") if fp32 else "16bit"


def _table(kernel: str, capability: int, fp32: bool) -> list[Config]:
    table = CANDIDATES[kernel][arch_key(capability)]
    return [c.for_fp32() for c in table] if fp32 else list(table)


def dropped(kernel: str, capability: int, fp32: bool = False, precision: str = "ieee", codes: bool = False,
            aligned: bool = True) -> frozenset[str]:
    """Names of the configurations `DROPPED` removes for this kernel, GPU, operands, use and layout."""
    if capability == 0:
        return frozenset()
    key = (kernel, arch_key(capability), operands(fp32, precision), "codes" if codes else "plain",
           "aligned" if aligned else "unaligned")
    return DROPPED.get(key, frozenset())


def dropped_configs(kernel: str, capability: int, fp32: bool = False, precision: str = "ieee", codes: bool = False,
                    aligned: bool = True) -> list[Config]:
    """The configurations `DROPPED` removes (the compile check still lowers them, as evidence)."""
    names = dropped(kernel, capability, fp32, precision, codes, aligned)
    return [c for c in _table(kernel, capability, fp32) if c.name in names]


def candidates(kernel: str, capability: int, fp32: bool = False, precision: str = "ieee", codes: bool = False,
               aligned: bool = True) -> list[Config]:
    """The configurations `choose` times for this kernel, GPU, operands, use and layout (dropped ones removed)."""
    if capability == 0:
        return [INTERPRETER[kernel]]
    names = dropped(kernel, capability, fp32, precision, codes, aligned)
    return [c for c in _table(kernel, capability, fp32) if c.name not in names]


def default(kernel: str, capability: int, m: int, fp32: bool = False, precision: str = "ieee",
            codes: bool = False, aligned: bool = True) -> Config:
    """The configuration used without timing: the small-row tile for few rows, else the second
    (mid-size) one, among the candidates; both are lowered for every architecture by the compile-only
    check. Where `DROPPED` left no candidate (the backend then offers no such kernel), a launcher
    called directly still gets the table's choice: correct, though it spills."""
    if capability == 0:
        return INTERPRETER[kernel]
    table = candidates(kernel, capability, fp32, precision, codes, aligned) or _table(kernel, capability, fp32)
    return table[0] if (m <= 64 and kernel != "recomposed_ds") or len(table) < 2 else table[1]


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
