"""ds of route R: ds_k = Σ_i (Uᵀ·G)_ki · Vh_ki with G = gradᵀ·x (d_out × d_in).

One program per (rank tile, d_in tile) accumulates its (Uᵀ·G) tile over d_out in fp32, multiplies
it by the matching Vh tile and reduces over its d_in columns into one row of partials; the partials
are summed afterwards in a fixed order. Uᵀ·G (r × d_in) is never written. G itself is one GEMM
(cuBLAS), the same size as the weight gradient of `nn.Linear`.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import runtime, tuning


@triton.jit
def recomposed_ds_kernel(
    u_ptr, g_ptr, vh_ptr, part_ptr,
    D_OUT, R, D_IN,
    stride_uo, stride_ur, stride_go, stride_gi, stride_vr, stride_vi,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_r = offs_r < R
    mask_i = offs_i < D_IN
    acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_O):
        offs_o = (o0 + tl.arange(0, BLOCK_O)).to(tl.int64)
        mask_o = offs_o < D_OUT
        ut = tl.load(u_ptr + offs_o[None, :] * stride_uo + offs_r[:, None] * stride_ur,
                     mask=mask_r[:, None] & mask_o[None, :], other=0.0)
        g = tl.load(g_ptr + offs_o[:, None] * stride_go + offs_i[None, :] * stride_gi,
                    mask=mask_o[:, None] & mask_i[None, :], other=0.0)
        if CAST_F32:
            ut = ut.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(ut, g, acc, input_precision=PRECISION)
    vh = tl.load(vh_ptr + offs_r[:, None] * stride_vr + offs_i[None, :] * stride_vi,
                 mask=mask_r[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
    tl.store(part_ptr + pid_i * R + offs_r, tl.sum(acc * vh, axis=1), mask=mask_r)


def recomposed_ds(U: torch.Tensor, G: torch.Tensor, Vh: torch.Tensor,
                  cfg: Optional[tuning.Config] = None) -> torch.Tensor:
    """rowsum((Uᵀ·G) ⊙ Vh) in float32 for U (d_out×r), G (d_out×d_in), Vh (r×d_in); any strides."""
    runtime.check_operands("recomposed_ds", {"U": U, "G": G, "Vh": Vh})
    d_out, r = U.shape
    if G.shape[0] != d_out or Vh.shape != (r, G.shape[1]):
        raise ValueError(f"recomposed_ds: shapes differ: U {tuple(U.shape)}, G {tuple(G.shape)}, Vh {tuple(Vh.shape)}")
    d_in = G.shape[1]
    cfg = cfg or tuning.default("recomposed_ds", runtime.capability(U.device), r, U.dtype == torch.float32,
                              runtime.dot_precision(U.dtype), aligned=runtime.aligned((U, G, Vh), (d_out, r, d_in)))
    n_i = triton.cdiv(d_in, cfg["BLOCK_I"])
    part = torch.empty((n_i, r), device=U.device, dtype=torch.float32)
    grid = (triton.cdiv(r, cfg["BLOCK_R"]), n_i)
    with runtime.device_guard(U):
        recomposed_ds_kernel[grid](
            U, G, Vh, part, d_out, r, d_in,
            U.stride(0), U.stride(1), G.stride(0), G.stride(1), Vh.stride(0), Vh.stride(1),
            CAST_F32=runtime.cast_f32(U.dtype), PRECISION=runtime.dot_precision(U.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
        )
    return part.sum(0)
