"""Triton backend: the five primitives on the kernels of `imse_kernels.triton_kernels`.

Each primitive has equivalent implementations ("variants"), and `triton_kernels.tuning` picks one
per shape by timing on the GPU (cached), or a shape heuristic where timing is off:

- fused:  one `chain` launch (the F route streamed over rank chunks, nothing N×r written unless h
          must be saved); wins at small N or when the output has few column tiles;
- split:  a Triton GEMM with s and the ds epilogue fused, plus one cuBLAS GEMM for the
          plain product; wins at large N, where `chain` would recompute `mid` per column tile;
- triton: (recomposition, route-R ds) the Triton kernel alone;
- blas:   the torch backend (cuBLAS GEMMs), kept as a candidate so the backend never loses to it.

Kernels launch directly inside the custom ops (no `wrap_triton`), so `torch.compile(fullgraph=True)`
treats them as opaque ops. float64 calls (gradcheck) run through the torch backend: Triton's fp64
dot is not a path worth tuning.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from ..triton_kernels import runtime, tuning
from ..triton_kernels.chain import MAX_CODES, chain
from ..triton_kernels.recomposed_ds import recomposed_ds
from ..triton_kernels.scaled_matmul import scaled_matmul
from .base import FACTORIZED, RECOMPOSED, SpectralBackend
from .torch_backend import TorchBackend

_torch = TorchBackend()


def _fused_or_split(fused: Callable, split: Callable) -> dict:
    """The two kernel variants of the F-route primitives: `chain` or `scaled_matmul` + cuBLAS."""
    return {"fused": ("chain", fused), "split": ("scaled_matmul", split)}


class TritonBackend(SpectralBackend):
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        return runtime.unavailable_reason()

    def supports(self, device: torch.device) -> bool:
        return runtime.supports(device)

    # ---------------------------------------------------------------------------------------
    # Plumbing

    @staticmethod
    def _native(t: Tensor) -> bool:
        """True when the kernels take t's dtype; float64 goes to the torch backend."""
        return t.dtype != torch.float64

    @staticmethod
    def _key(op: str, dev: torch.device, n: int, dims: tuple, dtype: torch.dtype, *flags) -> str:
        cap = runtime.capability(dev)
        return "|".join([op, f"sm{cap}", f"n{tuning.bucket(n)}", "x".join(map(str, dims)),
                         runtime.TL_DTYPE.get(dtype, str(dtype)), runtime.dot_precision(dtype), *map(str, flags)])

    @staticmethod
    def _run(key: str, t: Tensor, kernel_variants: dict[str, tuple[str, Callable]], blas: Callable,
             default: str, m: int, layout: tuple, codes: bool = False) -> object:
        """Build candidates (variant/config for each kernel variant, plus blas) for operands like t
        (device, dtype), choose one, run it. `layout` = (tensors, sizes) of the problem, for
        `runtime.aligned`; `codes`: the per-sample-code launches. Both select the dropped tiles."""
        dev, fp32, precision = t.device, t.dtype == torch.float32, runtime.dot_precision(t.dtype)
        cap = runtime.capability(dev)
        aligned = runtime.aligned(*layout)
        key += "|aligned" if aligned else "|unaligned"
        cands: dict[str, Callable[[], object]] = {}
        for variant, (kernel, make) in kernel_variants.items():
            for cfg in tuning.candidates(kernel, cap, fp32, precision, codes, aligned):
                cands[f"{variant}/{cfg.name}"] = (lambda make=make, cfg=cfg: make(cfg))
        cands["blas"] = blas
        default = TritonBackend._default_variant(default, t.dtype, precision, cap)
        offered = [v for v, (kernel, _) in kernel_variants.items()
                   if tuning.candidates(kernel, cap, fp32, precision, codes, aligned)]
        if default != "blas" and default not in offered:  # every tile of its kernel dropped here (tuning.DROPPED)
            default = offered[0] if offered else "blas"
        if default != "blas":
            kernel = kernel_variants[default][0]
            default = f"{default}/{tuning.default(kernel, cap, m, fp32, precision, codes, aligned).name}"
        return cands[tuning.choose(key, dev, cands, default)]()

    @staticmethod
    def _default_variant(variant: str, dtype: torch.dtype, precision: str, capability: int) -> str:
        """The variant run without timing: fp32 with IEEE dots goes to cuBLAS on a GPU (Triton's
        FMA dots are slower); the tuner and a forced variant can still pick the kernels, and the
        interpreter (capability 0) runs them, since there they are what is tested."""
        if capability > 0 and dtype == torch.float32 and precision == "ieee":
            return "blas"
        return variant

    @staticmethod
    def _fused_first(t: Tensor, n: int, n_out: int) -> str:
        """Heuristic without timing: `chain` when its recomputation is cheap or launches dominate."""
        cfg = tuning.default("chain", runtime.capability(t.device), n, t.dtype == torch.float32,
                              runtime.dot_precision(t.dtype))
        return "fused" if n <= 256 or n_out <= cfg["BLOCK_N"] else "split"

    @staticmethod
    def _check(op: str, s: Tensor, **named: Optional[Tensor]) -> None:
        """Clear errors for what the kernels cannot take: dtypes, devices, ranks of the operands."""
        tensors = {k: (v.unsqueeze(0) if k == "bias" and v.dim() == 1 else v)
                   for k, v in named.items() if v is not None}
        runtime.check_operands(f"triton {op}", tensors)
        U = named["U"]
        if s.dim() != 1 or s.shape[0] != U.shape[1] or s.device != U.device or not s.is_floating_point():
            raise ValueError(f"triton {op}: s must be a floating 1-D tensor of length r={U.shape[1]} on {U.device}, "
                             f"got {s.dtype} {tuple(s.shape)} on {s.device}")

    # ---------------------------------------------------------------------------------------
    # Primitives

    def factorized_forward(self, x, U, s, Vh, bias, save_h):
        if not self._native(x):
            return _torch.factorized_forward(x, U, s, Vh, bias, save_h)
        self._check("factorized_forward", s, x=x, U=U, Vh=Vh, bias=bias)
        n, (d_out, r) = x.shape[0], U.shape

        def fused(cfg):
            y, h, _ = chain(x, Vh.t(), s, U.t(), bias, save_h=save_h, cfg=cfg)
            return y, h

        def split(cfg):
            h = x @ Vh.t()
            y, _ = scaled_matmul(h, U.t(), s, bias, scale="k", cfg=cfg)
            return y, (h if save_h else None)

        key = self._key("fwd", x.device, n, (x.shape[1], d_out, r), x.dtype, save_h, bias is not None)
        default = self._fused_first(x, n, d_out)
        return self._run(key, x, _fused_or_split(fused, split),
                         lambda: _torch.factorized_forward(x, U, s, Vh, bias, save_h), default, n,
                         ((x, U, Vh, bias), (x.shape[1], d_out, r)))

    def recompose(self, U, s, Vh):
        if not self._native(U):
            return _torch.recompose(U, s, Vh)
        self._check("recompose", s, U=U, Vh=Vh)

        def triton_(cfg):
            return scaled_matmul(U, Vh, s, scale="k", cfg=cfg)[0]

        key = self._key("recompose", U.device, U.shape[0], (U.shape[1], Vh.shape[1]), U.dtype)
        return self._run(key, U, {"triton": ("scaled_matmul", triton_)},
                         lambda: _torch.recompose(U, s, Vh), "triton", U.shape[0], ((U, Vh), U.shape + Vh.shape))

    def factorized_backward(self, grad, h, U, s, Vh, need_dx):
        if not self._native(grad):
            return _torch.factorized_backward(grad, h, U, s, Vh, need_dx)
        self._check("factorized_backward", s, grad=grad, h=h, U=U, Vh=Vh)
        n, (d_out, r), d_in = grad.shape[0], U.shape, Vh.shape[1]
        if h.shape != (n, r):
            raise ValueError(f"triton factorized_backward: h must be ({n}, {r}), got {tuple(h.shape)}")

        if not need_dx:  # ds alone: t = grad·U is reduced against h on chip and never written
            def ds_only(cfg):
                return None, scaled_matmul(grad, U, h=h, write_c=False, cfg=cfg)[1].to(s.dtype)

            key = self._key("bwd_ds", grad.device, n, (d_in, d_out, r), grad.dtype)
            return self._run(key, grad, {"split": ("scaled_matmul", ds_only)},
                             lambda: _torch.factorized_backward(grad, h, U, s, Vh, False), "split", n,
                             ((grad, h, U, Vh), (d_in, d_out, r)))

        def fused(cfg):
            dx, _, ds = chain(grad, U, s, Vh, h=h, cfg=cfg)
            return dx, ds.to(s.dtype)

        def split(cfg):
            ts, ds = scaled_matmul(grad, U, s, scale="n", h=h, cfg=cfg)
            return ts @ Vh, ds.to(s.dtype)

        key = self._key("bwd", grad.device, n, (d_in, d_out, r), grad.dtype)
        default = self._fused_first(grad, n, d_in)
        return self._run(key, grad, _fused_or_split(fused, split),
                         lambda: _torch.factorized_backward(grad, h, U, s, Vh, True), default, n,
                         ((grad, h, U, Vh), (d_in, d_out, r)))

    def factorized_input_grad(self, grad, U, s, Vh):
        if not self._native(grad):
            return _torch.factorized_input_grad(grad, U, s, Vh)
        self._check("factorized_input_grad", s, grad=grad, U=U, Vh=Vh)
        n, (d_out, r), d_in = grad.shape[0], U.shape, Vh.shape[1]

        def fused(cfg):
            return chain(grad, U, s, Vh, cfg=cfg)[0]

        def split(cfg):
            return scaled_matmul(grad, U, s, scale="n", cfg=cfg)[0] @ Vh

        key = self._key("dx", grad.device, n, (d_in, d_out, r), grad.dtype)
        default = self._fused_first(grad, n, d_in)
        return self._run(key, grad, _fused_or_split(fused, split),
                         lambda: _torch.factorized_input_grad(grad, U, s, Vh), default, n,
                         ((grad, U, Vh), (d_in, d_out, r)))

    def recomposed_backward(self, grad, x, U, s, Vh, W, need_dx):
        if not self._native(grad):
            return _torch.recomposed_backward(grad, x, U, s, Vh, W, need_dx)
        self._check("recomposed_backward", s, grad=grad, x=x, U=U, Vh=Vh, W=W)
        n, (d_out, r), d_in = grad.shape[0], U.shape, Vh.shape[1]

        def triton_(cfg):
            G = grad.t() @ x
            return (grad @ W if need_dx else None), recomposed_ds(U, G, Vh, cfg=cfg).to(s.dtype)

        key = self._key("bwd_R", grad.device, n, (d_in, d_out, r), grad.dtype, need_dx)
        return self._run(key, grad, {"triton": ("recomposed_ds", triton_)},
                         lambda: _torch.recomposed_backward(grad, x, U, s, Vh, W, need_dx), "triton", n,
                         ((grad, x, U, Vh, W), (d_in, d_out, r)))

    # ---------------------------------------------------------------------------------------
    # Per-sample codes (docs/design.md §8): the gather is folded into `chain`'s scale step and its
    # ds partials (per row tile and code); "blas" is the protocol's ATen default, which also serves
    # tables of more than MAX_CODES codes (the chain's one-hot tile would compile for minutes).

    def indexed_forward(self, x, U, S, Vh, bias, index, save_h):
        if not self._native(x) or S.shape[0] > MAX_CODES:
            return super().indexed_forward(x, U, S, Vh, bias, index, save_h)
        self._check("indexed_forward", S[0], x=x, U=U, Vh=Vh, bias=bias)

        def fused(cfg):
            y, h, _ = chain(x, Vh.t(), S, U.t(), bias, save_h=save_h, index=index, cfg=cfg)
            return y, h

        key = self._key("fwd_idx", x.device, x.shape[0], (x.shape[1], *U.shape, S.shape[0]), x.dtype, save_h,
                        bias is not None)
        return self._run(key, x, {"fused": ("chain", fused)},
                         lambda: super(TritonBackend, self).indexed_forward(x, U, S, Vh, bias, index, save_h),
                         "fused", x.shape[0], ((x, U, Vh, bias), (x.shape[1], *U.shape)), codes=True)

    def indexed_backward(self, grad, h, U, S, Vh, index, need_dx):
        if not self._native(grad) or not need_dx or S.shape[0] > MAX_CODES:  # dS alone: t = grad·U, a segmented sum
            return super().indexed_backward(grad, h, U, S, Vh, index, need_dx)
        self._check("indexed_backward", S[0], grad=grad, h=h, U=U, Vh=Vh)

        def fused(cfg):
            dx, _, dS = chain(grad, U, S, Vh, h=h, index=index, cfg=cfg)
            return dx, dS.to(S.dtype)

        key = self._key("bwd_idx", grad.device, grad.shape[0], (Vh.shape[1], *U.shape, S.shape[0]), grad.dtype)
        return self._run(key, grad, {"fused": ("chain", fused)},
                         lambda: super(TritonBackend, self).indexed_backward(grad, h, U, S, Vh, index, True),
                         "fused", grad.shape[0], ((grad, h, U, Vh), (Vh.shape[1], *U.shape)), codes=True)

    def indexed_input_grad(self, grad, U, S, Vh, index):
        if not self._native(grad) or S.shape[0] > MAX_CODES:
            return super().indexed_input_grad(grad, U, S, Vh, index)
        self._check("indexed_input_grad", S[0], grad=grad, U=U, Vh=Vh)

        def fused(cfg):
            return chain(grad, U, S, Vh, index=index, cfg=cfg)[0]

        key = self._key("dx_idx", grad.device, grad.shape[0], (Vh.shape[1], *U.shape, S.shape[0]), grad.dtype)
        return self._run(key, grad, {"fused": ("chain", fused)},
                         lambda: super(TritonBackend, self).indexed_input_grad(grad, U, S, Vh, index),
                         "fused", grad.shape[0], ((grad, U, Vh), (Vh.shape[1], *U.shape)), codes=True)

    # ---------------------------------------------------------------------------------------
    # Route choice by measurement (for the planner)

    def measured_route(self, n: int, d_in: int, d_out: int, r: int, need_ds: bool, need_dx: bool,
                       has_weight: bool, dtype: torch.dtype, device: torch.device) -> Optional[int]:
        """The faster route (FACTORIZED or RECOMPOSED) for this call, timed once per shape key on the GPU
        (forward plus the backward that will follow, on synthetic data) and cached; None where
        timing is off (the default; CPU/interpreter; CUDA graph capture) or the dtype is not a
        kernel dtype, so the planner falls back to its FLOP model."""
        if not tuning.enabled(device) or dtype not in runtime.KERNEL_DTYPES or torch.compiler.is_compiling():
            return None
        key = self._key("route", device, n, (d_in, d_out, r), dtype, need_ds, need_dx, has_weight)
        cached = tuning.choices().get(key)
        if cached is not None:
            return FACTORIZED if cached == "F" else RECOMPOSED
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, d_in, device=device, dtype=dtype, generator=g)
        U = torch.randn(d_out, r, device=device, dtype=dtype, generator=g) / d_out ** 0.5
        Vh = torch.randn(r, d_in, device=device, dtype=dtype, generator=g) / d_in ** 0.5
        s = torch.rand(r, device=device, generator=g) + 0.5
        b = torch.zeros(d_out, device=device, dtype=dtype)
        grad = torch.randn(n, d_out, device=device, dtype=dtype, generator=g)
        W_cached = self.recompose(U, s, Vh) if has_weight else None

        def route_f():
            _, h = self.factorized_forward(x, U, s, Vh, b, need_ds)
            if need_ds:
                self.factorized_backward(grad, h, U, s, Vh, need_dx)
            elif need_dx:
                self.factorized_input_grad(grad, U, s, Vh)

        def route_r():
            W = W_cached if W_cached is not None else self.recompose(U, s, Vh)
            self.dense_forward(x, W, b)
            if need_ds:
                self.recomposed_backward(grad, x, U, s, Vh, W, need_dx)
            elif need_dx:
                self.dense_input_grad(grad, W)

        with torch.no_grad():
            best = tuning.choose(key, device, {"F": route_f, "R": route_r}, "F")
        return FACTORIZED if best == "F" else RECOMPOSED
