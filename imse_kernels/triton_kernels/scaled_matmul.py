"""GEMM with the singular values applied on the fly: C = (A ⊙ s_K)·B ⊙ s_N + bias.

`s` scales either the reduction dimension (SCALE_K, a prologue on each A tile: the recomposition
W' = (U ⊙ s)·Vh and y = (h ⊙ s)·Uᵀ) or the output columns (SCALE_N, an epilogue: ts = t ⊙ s), so
no diag matrix and no scaled copy of a factor is ever built. The optional DS epilogue sees the
unscaled product C₀ = A·B in fp32 before it is rounded: per-row-tile partials Σ_rows C₀ ⊙ H (H has
C's shape), summed afterwards in a fixed order (deterministic, no atomics).

These are the stages of the split F paths (`t = grad·U` with the ds epilogue, then dx) and the
recomposition of route R.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import runtime, tuning
from .runtime import grouped_tile


@triton.jit
def scaled_matmul_kernel(
    a_ptr, b_ptr, s_ptr, bias_ptr, c_ptr, h_ptr, ds_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
    SCALE_K: tl.constexpr, SCALE_N: tl.constexpr, HAS_BIAS: tl.constexpr, DS: tl.constexpr,
    WRITE_C: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_K:
            s_k = tl.load(s_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s_k[None, :]).to(a_ptr.dtype.element_ty)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if DS:
        hv = tl.load(h_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        tl.store(ds_ptr + pid_m * N + offs_n, tl.sum(acc * hv, axis=0), mask=mask_n)
    if WRITE_C:
        if SCALE_N:
            acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def scaled_matmul(
    a: torch.Tensor, b: torch.Tensor, s: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    *, scale: str = "k", h: Optional[torch.Tensor] = None, write_c: bool = True,
    cfg: Optional[tuning.Config] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """C = (a ⊙ s)·b + bias (scale='k', s of length K) or (a·b) ⊙ s + bias (scale='n', length N);
    a (M×K), b (K×N), any strides (a strided bias is copied); C in a's dtype.

    Returns (C, ds): ds = Σ_rows (a·b) ⊙ h (float32, (N,)) when h is given, else None.
    write_c=False computes only ds (C is returned as None and never allocated).
    """
    runtime.check_operands("scaled_matmul", {"a": a, "b": b}
                           | ({"bias": bias.unsqueeze(0)} if bias is not None else {}))
    if scale not in ("k", "n"):
        raise ValueError(f"scaled_matmul: scale must be 'k' or 'n', got {scale!r}")
    M, K = a.shape
    K2, N = b.shape
    if K2 != K:
        raise ValueError(f"scaled_matmul: inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    if s is not None and s.shape != ((K,) if scale == "k" else (N,)):
        raise ValueError(f"scaled_matmul: s has shape {tuple(s.shape)}, "
                         f"expected ({K if scale == 'k' else N},) for scale={scale!r}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"scaled_matmul: bias must be ({N},), got {tuple(bias.shape)}")
    if h is not None and h.shape != (M, N):
        raise ValueError(f"scaled_matmul: h must be ({M}, {N}), got {tuple(h.shape)}")
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at unit stride
    cfg = cfg or tuning.default("scaled_matmul", runtime.capability(a.device), M, a.dtype == torch.float32,
                              runtime.dot_precision(a.dtype), aligned=runtime.aligned((a, b, bias, h), (K, N)))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_m = triton.cdiv(M, bm)
    if not write_c and h is None:
        raise ValueError("scaled_matmul: write_c=False needs h, else there is nothing to compute")
    c = a.new_empty((M, N) if write_c else (1, 1))
    ds_part = torch.empty((num_m, N), device=a.device, dtype=torch.float32) if h is not None else None
    if M == 0:
        return (c if write_c else None), (None if h is None else a.new_zeros((N,), dtype=torch.float32))
    hs = h.stride() if h is not None else (0, 0)
    grid = (num_m * triton.cdiv(N, bn),)
    with runtime.device_guard(a):
        scaled_matmul_kernel[grid](
            a, b, s if s is not None else c, bias if bias is not None else c, c,
            h if h is not None else c, ds_part if ds_part is not None else c,
            M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), hs[0], hs[1],
            SCALE_K=s is not None and scale == "k", SCALE_N=s is not None and scale == "n",
            HAS_BIAS=bias is not None, DS=h is not None, WRITE_C=write_c,
            CAST_F32=runtime.cast_f32(a.dtype), PRECISION=runtime.dot_precision(a.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
        )
    return (c if write_c else None), (ds_part.sum(0) if ds_part is not None else None)
