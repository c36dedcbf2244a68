"""The fused F-route kernel: out = ((A·B1) ⊙ s)·B2 (+ bias) in one launch.

Per (row tile, output column tile) program the rank is streamed in chunks of BLOCK_R:
`mid = A_tile·B1[:, chunk]` (fp32, on chip) is scaled by `s[chunk]` and accumulated into the output
tile through `·B2[chunk, :]`; `mid` never reaches memory. The programs of output column tile 0
also run the epilogues that need `mid` itself:

- DS:      per-row-tile partial sums Σ_rows mid ⊙ H[:, chunk] (one row of partials per row tile,
           summed afterwards in a fixed order: deterministic, no atomics);
- SAVE_H:  write mid (rounded to the output dtype) as h.

INDEXED (per-sample codes, docs/design.md §8): s is a (K, R) table and row m is scaled by
s[idx[m]], gathered per row tile in the scale step; the DS partials are then per (row tile, code),
reduced by a one-hot product inside the tile, so no float atomics and no N×R product is written.
A code outside [0, K) is clamped for the load (nothing outside s is read) and its row of the
output comes out NaN, and it adds to no code's partials: what the CUDA gather kernel does
(docs/design.md §5). The one-hot tile has CODES_P2 rows, so the launcher takes at most MAX_CODES
codes (larger tables are ever larger specialisations; the backend sends them to the segmented ATen path).

Forward:     A = x (N×d_in),  B1 = Vhᵀ, B2 = Uᵀ,  out = y
Backward:    A = grad (N×d_out), B1 = U, B2 = Vh, out = dx, DS with H = h → ds
The price is that `mid` is recomputed for every output column tile: this kernel wins when the
output has few column tiles or N is small (one launch, no N×r round trip); `tuning.py` decides.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import runtime, tuning
from .runtime import grouped_tile

# The most codes `chain` takes with `index`: its one-hot tile has CODES_P2 = next power of two rows, each
# larger table is a new and larger specialisation (minutes to lower at 1024; docs/design.md §5, §10).
MAX_CODES = 64


@triton.jit
def chain_kernel(
    a_ptr, b1_ptr, s_ptr, b2_ptr, bias_ptr, out_ptr, h_ptr, hout_ptr, ds_ptr, idx_ptr,
    M, K, R, N, NUM_CODES,
    stride_am, stride_ak, stride_b1k, stride_b1r, stride_b2r, stride_b2n,
    stride_om, stride_on, stride_hm, stride_hr, stride_hom, stride_hor, stride_s,
    HAS_BIAS: tl.constexpr, DS: tl.constexpr, SAVE_H: tl.constexpr, INDEXED: tl.constexpr,
    CODES_P2: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    epilogue = pid_n == 0
    if INDEXED:
        code = tl.load(idx_ptr + rows, mask=mask_m, other=0)
        in_range = (code >= 0) & (code < NUM_CODES)
        code = tl.where(in_range, code, 0)
        codes_p2 = tl.arange(0, CODES_P2)
        onehot_t = ((codes_p2[:, None] == code[None, :]) & in_range[None, :]).to(tl.float32)  # (CODES_P2, BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        mid = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b1 = tl.load(b1_ptr + offs_k[:, None] * stride_b1k + offs_r[None, :] * stride_b1r,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if CAST_F32:
                a = a.to(tl.float32)
                b1 = b1.to(tl.float32)
            mid = tl.dot(a, b1, mid, input_precision=PRECISION)

        if epilogue:
            if DS:
                hv = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                if INDEXED:  # Σ over this tile's rows per code; rows with a bad code add nothing. tf32x3:
                    # the one-hot is exact in tf32 and each product is split into two tf32 parts, so the sum
                    # keeps fp32 accuracy; an IEEE (FMA) dot here spilled 600-900 bytes per thread.
                    part = tl.dot(onehot_t, tl.where(in_range[:, None], mid * hv, 0.0), input_precision="tf32x3")
                    tl.store(ds_ptr + pid_m * CODES_P2 * R + codes_p2[:, None] * R + offs_r[None, :], part,
                             mask=(codes_p2[:, None] < NUM_CODES) & mask_r[None, :])
                else:
                    tl.store(ds_ptr + pid_m * R + offs_r, tl.sum(mid * hv, axis=0), mask=mask_r)
            if SAVE_H:
                tl.store(hout_ptr + rows[:, None] * stride_hom + offs_r[None, :] * stride_hor,
                         mid.to(hout_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])

        if INDEXED:
            scaled = mid * tl.load(s_ptr + code[:, None] * stride_s + offs_r[None, :],
                                   mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            scaled = tl.where(in_range[:, None], scaled, float("nan"))
        else:
            scaled = mid * tl.load(s_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        b2 = tl.load(b2_ptr + offs_r[:, None] * stride_b2r + offs_n[None, :] * stride_b2n,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            b2 = b2.to(tl.float32)
        acc = tl.dot(scaled.to(b2.dtype), b2, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def chain(
    a: torch.Tensor, b1: torch.Tensor, s: torch.Tensor, b2: torch.Tensor, bias: Optional[torch.Tensor] = None,
    *, h: Optional[torch.Tensor] = None, save_h: bool = False, index: Optional[torch.Tensor] = None,
    cfg: Optional[tuning.Config] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """out = ((a·b1) ⊙ s)·b2 + bias for a (M×K), b1 (K×R), s (R,), b2 (R×N); any strides.
    With `index` (int64 (M,)) s is a (C, R) table, C <= MAX_CODES, and row m uses s[index[m]]; a row
    whose code is outside [0, C) comes out NaN and adds nothing to ds. A strided bias is copied.

    Returns (out, h_out, ds): h_out = a·b1 in a's dtype when save_h; ds = Σ_rows (a·b1) ⊙ h
    (float32, (R,), or (C, R) summed per code with `index`) when h is given. Unrequested results are None.
    """
    runtime.check_operands("chain", {"a": a, "b1": b1, "b2": b2}
                           | ({"bias": bias.unsqueeze(0)} if bias is not None else {}))
    M, K = a.shape
    R, N = b2.shape
    s_shape = (R,) if index is None else (s.shape[0], R)
    if b1.shape != (K, R) or s.shape != s_shape or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"chain: shapes do not chain: a {tuple(a.shape)}, b1 {tuple(b1.shape)}, s {tuple(s.shape)}, "
                         f"b2 {tuple(b2.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if h is not None and h.shape != (M, R):
        raise ValueError(f"chain: h must be ({M}, {R}), got {tuple(h.shape)}")
    if index is not None and (index.shape != (M,) or index.dtype != torch.int64 or index.device != a.device):
        raise ValueError(f"chain: index must be int64 ({M},) on {a.device}, got {index.dtype} {tuple(index.shape)} "
                         f"on {index.device}")
    codes = 1 if index is None else s.shape[0]
    if codes > MAX_CODES:
        raise ValueError(f"chain: index takes at most {MAX_CODES} codes (a one-hot tile of more compiles for "
                         f"minutes), got a table of {codes}; use the ATen path (the backends' indexed_* default)")
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at unit stride
    codes_p2 = max(16, triton.next_power_of_2(codes))  # tl.dot needs at least 16 rows
    cfg = cfg or tuning.default("chain", runtime.capability(a.device), M, a.dtype == torch.float32,
                              runtime.dot_precision(a.dtype), codes=index is not None,
                              aligned=runtime.aligned((a, b1, b2, bias, h), (K, R, N)))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_m = triton.cdiv(M, bm)
    out = a.new_empty((M, N))
    hout = a.new_empty((M, R)) if save_h else None
    part_shape = (num_m, R) if index is None else (num_m, codes_p2, R)
    ds_part = torch.empty(part_shape, device=a.device, dtype=torch.float32) if h is not None else None
    if M == 0:
        return out, hout, None if h is None else a.new_zeros(s_shape, dtype=torch.float32)
    hs = h.stride() if h is not None else (0, 0)
    hos = hout.stride() if hout is not None else (0, 0)
    grid = (num_m * triton.cdiv(N, bn),)
    with runtime.device_guard(a):
        chain_kernel[grid](
            a, b1, s, b2, bias if bias is not None else out, out,
            h if h is not None else out, hout if hout is not None else out,
            ds_part if ds_part is not None else out, index if index is not None else out,
            M, K, R, N, codes,
            a.stride(0), a.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1),
            out.stride(0), out.stride(1), hs[0], hs[1], hos[0], hos[1], s.stride(0) if index is not None else 0,
            HAS_BIAS=bias is not None, DS=h is not None, SAVE_H=save_h, INDEXED=index is not None,
            CODES_P2=codes_p2, CAST_F32=runtime.cast_f32(a.dtype), PRECISION=runtime.dot_precision(a.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
        )
    if ds_part is None:
        return out, hout, None
    return out, hout, (ds_part if index is None else ds_part[:, :codes]).sum(0)
