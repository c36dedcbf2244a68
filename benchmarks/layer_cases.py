"""The layer-level cases and their FLOP model: which ViT layer, batch, mode and dtype a case is, and how many
FLOPs each provider's route does on it (docs/design.md section 2). Shared by layer_bench.py, which measures the
cases, and report.py, which turns the FLOPs into GFLOP/s and gaps.
"""
from dataclasses import dataclass

import torch

TOKENS = 197  # 14 x 14 patches + CLS at 224 px, patch 16

SHAPES = {
    "vit_s": {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)},
    "vit_b": {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)},
}
MODES = ("fwd", "fwdbwd", "frozen", "infer")
BASELINE = {"fwd": "linear", "fwdbwd": "linear", "frozen": "linear_frozen", "infer": "linear"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    """One measured layer call: ViT `net` (vit_s, vit_b), `layer` (qkv, proj, fc1, fc2), batch, mode, dtype."""

    net: str
    layer: str
    batch: int
    mode: str
    dtype: str

    @property
    def d_in(self) -> int:
        return SHAPES[self.net][self.layer][0]

    @property
    def d_out(self) -> int:
        return SHAPES[self.net][self.layer][1]

    @property
    def tokens(self) -> int:
        return self.batch * TOKENS

    @property
    def name(self) -> str:
        return f"{self.net}.{self.layer}"


def nominal_flops(case: "Case", provider: str) -> float:
    """FLOPs of one call on the provider's route, GEMMs only (docs/design.md section 2): factorized
    2·N·r·(d_in + d_out) per pass (forward; backward t = g·U and dx), dense / reference / recomposed
    2·N·d_in·d_out per GEMM (forward, dx, dW). Recomposition and elementwise work are left out; a
    fused provider counts the route its FLOP model (or pin) picks."""
    n, d_in, d_out = case.tokens, case.d_in, case.d_out
    r = min(d_in, d_out)
    pinned = provider.rpartition("_")[2] if provider.endswith(("_F", "_R")) else None
    factorized = provider.startswith("naive") or pinned == "F" or (
        provider.startswith("fused_") and pinned is None and flop_model(case)[0] == "F")
    if factorized:
        return (1 if case.mode in ("fwd", "infer") else 2) * 2 * n * r * (d_in + d_out)
    gemms = {"fwd": 1, "infer": 1, "frozen": 2, "fwdbwd": 2 if provider == "linear_frozen" else 3}[case.mode]
    return gemms * 2 * n * d_in * d_out


def flop_model(case: "Case") -> tuple:
    """(route the FLOP model picks, its FLOPs / the baseline's FLOPs) for the measured call of `case`.

    Baseline FLOPs: nn.Linear forward 2·N·d_in·d_out, + 2·N·d_in·d_out for dx, + the same for dW.
    Spectral: imse_kernels.ops.planner.step_flops (forward only in mode fwd: the route the planner
    picks for the whole step, counted up to its output).
    """
    from imse_kernels.ops.planner import step_flops

    n, d_in, d_out = case.tokens, case.d_in, case.d_out
    r = min(d_in, d_out)
    dense = 2 * n * d_in * d_out
    need_ds = case.mode in ("fwd", "fwdbwd")
    need_dx = case.mode != "infer"
    has_weight = case.mode in ("frozen", "infer")
    f, R = step_flops(n, d_in, d_out, r, need_ds, need_dx, has_weight)
    route = "F" if f <= R else "R"
    if case.mode == "fwd":
        cost = 2 * n * r * (d_in + d_out) if route == "F" else 2 * r * d_in * d_out + dense
        return route, cost / dense
    base = dense * {"fwdbwd": 3, "frozen": 2, "infer": 1}[case.mode]
    return route, min(f, R) / base
