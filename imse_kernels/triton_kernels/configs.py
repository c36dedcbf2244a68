"""Tile configurations of each kernel: candidates per architecture (timed by `tuning.py`), one
default when timing is off or impossible, and one small configuration for the interpreter.

A configuration is a `Config`: the kernel's BLOCK_* / GROUP_M meta-parameters plus the launch
options `num_warps` and `num_stages`. Its `name` is stable, so timing results can be cached on disk.
"""
from dataclasses import dataclass, field


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
        80: [_chain(16, 64, 64, 64, 4, 2), _chain(64, 64, 64, 32, 4, 3), _chain(64, 128, 64, 32, 4, 3),
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


def arch_key(capability: int) -> int:
    """The candidate table for a compute capability: sm_90 and newer use the Hopper table."""
    return 90 if capability >= 90 else 80


def candidates(kernel: str, capability: int, fp32: bool = False) -> list[Config]:
    """The configurations `tuning.py` times for this kernel, GPU and operand width."""
    if capability == 0:
        return [INTERPRETER[kernel]]
    table = CANDIDATES[kernel][arch_key(capability)]
    return [c.for_fp32() for c in table] if fp32 else list(table)


def default(kernel: str, capability: int, m: int, fp32: bool = False) -> Config:
    """The configuration used without timing: the small-row tile for few rows, else the second
    (mid-size) one; both are lowered for every architecture by the compile-only check."""
    if capability == 0:
        return INTERPRETER[kernel]
    table = candidates(kernel, capability, fp32)
    return table[0] if (m <= 64 and kernel != "recomposed_ds") else table[1]
