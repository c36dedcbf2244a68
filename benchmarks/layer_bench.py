#!/usr/bin/env python
"""Layer level: one ViT linear layer, every provider side by side (docs/design.md section 2).

    python benchmarks/layer_bench.py --nets vit_b --layers proj --batches 1 --modes fwdbwd,infer --gflops
    python benchmarks/layer_bench.py --quick                    # smoke run, seconds
    python benchmarks/layer_bench.py --device cuda --triton     # the triton backend's speed cases (ViT-B)

Modes
  fwd     forward with s trainable and x requiring grad (what a training forward costs, saves included)
  fwdbwd  forward + backward, s trainable, dx needed (a layer inside a network being adapted)
  frozen  forward + backward with s frozen, dx only (IMSE's last blocks); baseline: nn.Linear frozen
  infer   torch.no_grad, s frozen (the recomposed weight is cached by FusedSpectralLinear)

Providers
  linear         nn.Linear, weight gradient (full fine-tuning; bias frozen like the spectral layer's)
  linear_frozen  nn.Linear, frozen weight (input gradient only)
  reference      F.linear(x, U @ torch.diag(s) @ Vh, b), recomposed every call (the reference code)
  naive          ((x @ Vh.T) * s) @ U.T + b in eager mode
  naive_compile  the same under torch.compile(dynamic=True)
  fused_<b>      FusedSpectralLinear under imse_kernels.use_backend(<b>), for every available backend, and auto
  fused_<b>_F/_R the same with the planner's route pinned (planner.force_route; opt-in)

Writes benchmarks/results/layer_<machine>[_quick].{json,csv,txt}; the tables, targets and files come
from report.py, the timing from bench_common.py.
"""
import argparse
import copy
import math
import sys
import time
from typing import Optional

import bench_common as BC
import report
import torch
import torch.nn.functional as F
from bench_common import (
    Record,
    SavedTensorTracker,
    Timing,
    device_peak_bytes,
    load1,
    measure_interleaved,
    min_ratio,
    paired_ratio,
)
from layer_cases import BASELINE, DTYPES, MODES, SHAPES, TOKENS, Case, nominal_flops
from torch import nn

import imse_kernels
from imse_kernels import FusedSpectralLinear, use_backend

BASE_PROVIDERS = ("linear", "linear_frozen", "reference", "naive", "naive_compile")


def fused_providers(device: str = "cpu") -> list:
    """fused_<b> for every available backend that runs on `device`, then fused_auto.

    On CPU the triton backend only exists through TRITON_INTERPRET=1 (an interpreter, for tests):
    it is left out of the default list (name it in --providers to time it anyway).
    """
    from imse_kernels.backends import get_backend

    dev = torch.device(device)
    names = [b for b in imse_kernels.available_backends() if get_backend(b).supports(dev)]
    if dev.type == "cpu":
        names = [b for b in names if b != "triton"]
    return [f"fused_{b}" for b in names] + ["fused_auto"]


def known_providers() -> list:
    """Every provider name that can be asked for by name (fused_<b>_F/_R: route pinned, opt-in)."""
    fused = [f"fused_{b}" for b in imse_kernels.available_backends()] + ["fused_auto"]
    return list(BASE_PROVIDERS) + fused + [f"{p}_{r}" for p in fused for r in "FR"]


def all_providers(device: str = "cpu") -> list:
    return list(BASE_PROVIDERS) + fused_providers(device)


def providers_for_mode(mode: str, wanted: list) -> list:
    skip = {"infer": {"linear_frozen"}, "frozen": {"linear"}}.get(mode, set())
    return [p for p in wanted if p not in skip]


def naive_expr(x, U, s, Vh, b):
    return ((x @ Vh.t()) * s.to(x.dtype)) @ U.t() + b


def reference_expr(x, U, s, Vh, b):
    return F.linear(x, U @ torch.diag(s.to(U.dtype)) @ Vh, b)


_compiled = {}


def compiled_naive():
    if "naive" not in _compiled:
        _compiled["naive"] = torch.compile(naive_expr, dynamic=True)
    return _compiled["naive"]


def _make_callable(provider: str, case: Case, linear: nn.Linear, fused: dict, x: torch.Tensor, g: torch.Tensor,
                   amp=None):
    """Returns (fn, exclude) where fn runs one call of `provider` in `case.mode`; exclude lists the
    layer's own parameters/buffers (not counted as saved activations). With `amp` (a precision of
    bench_common.AMP_DTYPES) the call runs under its autocast and the backward starts from g in that dtype."""
    mode = case.mode
    train_s = mode in ("fwd", "fwdbwd")
    backward = mode in ("fwdbwd", "frozen")
    grad_mode = mode != "infer"

    if provider in ("linear", "linear_frozen"):
        layer = nn.Linear(case.d_in, case.d_out, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            layer.bias.copy_(linear.bias)
        layer.bias.requires_grad_(False)
        layer.weight.requires_grad_(provider == "linear" and grad_mode)
        inputs = [x] + ([layer.weight] if layer.weight.requires_grad else [])
        call = layer
        exclude = [layer.weight, layer.bias]
    elif provider in ("reference", "naive", "naive_compile"):
        base = fused["_factors"]
        U, Vh, b = base.U, base.Vh, base.bias
        s = base.s.detach().clone().requires_grad_(train_s)
        if provider == "naive_compile":
            # 2-D input: a 3-D batch of 1 would specialise the compiled graph on that size
            compiled = compiled_naive()
            call = lambda inp: compiled(inp.view(-1, inp.shape[-1]), U, s, Vh, b).view(*inp.shape[:-1], -1)  # noqa: E731
        else:
            expr = reference_expr if provider == "reference" else naive_expr
            call = lambda inp: expr(inp, U, s, Vh, b)  # noqa: E731
        inputs = [x] + ([s] if train_s else [])
        exclude = [U, Vh, b, s]
    elif provider.startswith("fused_"):
        backend, _, pinned = provider[len("fused_"):].partition("_")
        layer = fused[provider]
        layer.s.requires_grad_(train_s)
        inputs = [x] + ([layer.s] if train_s else [])
        # the cached recomposed weight is persistent (like a weight), not an activation
        def exclude(layer=layer):
            return (layer.U, layer.Vh, layer.s, layer.bias, *layer._weight_cache.tensors())

        if pinned:
            from imse_kernels.ops.planner import force_route

            route = {"F": "factorized", "R": "recomposed"}[pinned]

            def call(inp, layer=layer, backend=backend, route=route):
                with use_backend(backend), force_route(route):
                    return layer(inp)
        elif backend == "auto":
            call = layer  # the default: no selection context around the call
        else:
            def call(inp, layer=layer, backend=backend):
                with use_backend(backend):
                    return layer(inp)
    else:
        raise ValueError(f"unknown provider {provider!r}")

    if amp is not None:
        g = g.to(BC.AMP_DTYPES[amp])
        plain, device = call, x.device.type

        def call(inp):
            with BC.amp_context(device, amp):
                return plain(inp)

    if mode == "infer":
        def fn():
            with torch.no_grad():
                return call(x)
    elif backward:
        def fn():
            y = call(x)
            return torch.autograd.grad(y, inputs, g)
    else:
        def fn():
            return call(x)
    return fn, exclude


def build_case(case: Case, device: str, providers: list, seed: int = 0, amp=None):
    """Builds the inputs and every provider's callable for one case (under autocast in `amp` if given)."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(case.d_in, case.d_out)
    with torch.no_grad():  # a pretrained-like spectrum: random weights have a flat one, which is fine for timing
        linear.weight.copy_(torch.randn(case.d_out, case.d_in, generator=gen) / math.sqrt(case.d_in))
        linear.bias.copy_(torch.randn(case.d_out, generator=gen) * 0.02)
    linear = linear.to(device=device, dtype=dtype)
    x = torch.randn(case.batch, TOKENS, case.d_in, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(case.mode != "infer")
    g = torch.randn(case.batch, TOKENS, case.d_out, generator=gen).to(device=device, dtype=dtype)
    base = FusedSpectralLinear.from_linear(linear)  # U, Vh in dtype; s fp32
    base.s.requires_grad_(False)
    fused = {"_factors": base}
    for p in providers:
        if p.startswith("fused_"):
            fused[p] = copy.deepcopy(base)
    fns, excludes = {}, {}
    for p in providers:
        fns[p], excludes[p] = _make_callable(p, case, linear, fused, x, g, amp)
    return fns, excludes


def run_case(case: Case, device: str, providers: list, rounds: int, min_block_s: float, warmup: int,
             min_rounds: int = 3, max_case_s: float = math.inf, memory: bool = True, log=print,
             precisions: Optional[list] = None) -> list:
    """One case, every provider side by side. With `precisions` (e.g. ["fp32", "bf16"]; the case's layer in
    fp32) every provider runs in every precision in one interleaved loop: bf16/fp16 under torch.autocast,
    and each record carries its speedup over the same provider in fp32 and over the reference in fp32."""
    providers = providers_for_mode(case.mode, providers)
    precs = precisions or [case.dtype]
    fns, excludes = {}, {}
    for prec in precs:
        f, e = build_case(case, device, providers, amp=prec if precisions and prec in BC.AMP_DTYPES else None)
        fns.update({_key(p, prec): fn for p, fn in f.items()})
        excludes.update({_key(p, prec): ex for p, ex in e.items()})
    saved, errors = {}, {}
    if memory and case.mode != "infer":
        # the first warm-up call of each provider doubles as the saved-tensor probe
        for k in fns:
            tracker = SavedTensorTracker(excludes[k])
            try:
                with tracker.track():
                    fns[k]()  # fwd: the graph dies with the output; the peak is what the forward saved
                saved[k] = tracker.peak / 2**20
            except Exception as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                errors[k] = f"{type(exc).__name__}: {first_line}"[:300]
                log(f"    {k}: {errors[k]}")
        warmup = max(1, warmup - 1)
    live = {k: f for k, f in fns.items() if k not in errors}
    timings = measure_interleaved(live, device, rounds, min_block_s, warmup, min_rounds=min_rounds,
                                  max_case_s=max_case_s * len(precs), log=log)
    load = load1()
    baseline = BASELINE[case.mode]
    ref32 = timings.get(_key("reference", "fp32")) if precisions else None
    records = []
    for prec in precs:
        ref, base_t = timings.get(_key("reference", prec)), timings.get(_key(baseline, prec))
        for p in providers:
            k = _key(p, prec)
            t = timings.get(k) or Timing(error=errors.get(k))
            lo, hi = t.quartiles()
            rec = Record(level="layer", case=case.name, batch=case.batch, tokens=case.tokens, mode=case.mode,
                         dtype=prec, provider=p, median_ms=t.median() * 1e3, min_ms=t.min() * 1e3,
                         q1_ms=lo * 1e3, q3_ms=hi * 1e3, rounds=len(t.times), number=t.number, baseline=baseline,
                         ratio_vs_baseline=paired_ratio(t, base_t) if base_t else math.nan,
                         speedup_vs_reference=paired_ratio(ref, t) if ref else math.nan,
                         ratio_vs_baseline_min=min_ratio(t, base_t) if base_t else math.nan,
                         speedup_vs_reference_min=min_ratio(ref, t) if ref else math.nan,
                         saved_mb=saved.get(k, math.nan), load1=load,
                         extra=f"{case.d_in}->{case.d_out}" + (" autocast" if prec in BC.AMP_DTYPES else ""),
                         gflop=nominal_flops(case, p) / 1e9, error=t.error or "")
            same32 = timings.get(_key(p, "fp32")) if precisions and prec != "fp32" else None
            if same32 is not None:
                rec.speedup_vs_fp32, rec.speedup_vs_fp32_min = paired_ratio(same32, t), min_ratio(same32, t)
            if ref32 is not None:
                rec.speedup_vs_reference_fp32 = paired_ratio(ref32, t)
                rec.speedup_vs_reference_fp32_min = min_ratio(ref32, t)
            if memory and t.ok and device == "cuda":
                peak, method = device_peak_bytes(fns[k], device)
                rec.peak_mb, rec.peak_method = (peak / 2**20 if peak is not None else math.nan), method
            records.append(rec)
    return records


def _key(provider: str, precision: str) -> str:
    return f"{provider}@{precision}"


# --------------------------------------------------------------------------------------------
# The script: flags, defaults, the measuring loop

# The triton backend's speed cases on a GPU (targets: targets.json, provider fused_triton).
TRITON_PRESET = {"nets": "vit_b", "batches": "64,1", "dtypes": "bf16,fp32", "modes": "fwdbwd,infer",
                 "providers": "linear,reference,fused_triton,fused_triton_F,fused_triton_R"}


def add_args(ap) -> None:
    ap.add_argument("--nets", default=None, help="vit_s,vit_b (default: both on CPU, vit_b on cuda)")
    ap.add_argument("--layers", default=None, help="default qkv,proj,fc1,fc2")
    ap.add_argument("--batches", default=None, help="default 1,8,64 (cpu) / 1,64 (cuda)")
    ap.add_argument("--modes", default=None, help="default fwd,fwdbwd,frozen,infer")
    ap.add_argument("--providers", default=None, help="layer providers (default: all available but the pinned routes)")
    ap.add_argument("--skip-providers", default="", help="layer providers to leave out, e.g. naive_compile")
    ap.add_argument("--dtypes", default=None, help="fp32 (cpu default), fp32,bf16 (cuda default); fp16 too")
    BC.add_precisions_arg(ap)
    ap.add_argument("--triton", action="store_true",
                    help="preset: " + " ".join(f"--{k} {v}" for k, v in TRITON_PRESET.items()))


def resolve(args, ap) -> None:
    if args.triton:
        for k, v in TRITON_PRESET.items():
            setattr(args, k, getattr(args, k) or v)
    q = args.quick
    args.nets = BC.csv_list(BC.default(args, args.nets, "vit_s,vit_b", "vit_b", "vit_s"))
    args.layers = BC.csv_list(args.layers or ("proj" if q else "qkv,proj,fc1,fc2"))
    args.batches = [int(b) for b in BC.csv_list(BC.default(args, args.batches, "1,8,64", "1,64", "1"))]
    args.modes = BC.csv_list(args.modes or ("fwdbwd,infer" if q else ",".join(MODES)))
    args.dtypes = BC.csv_list(BC.default(args, args.dtypes, "fp32", "fp32,bf16", "fp32"))
    # --precisions (shared with the model level): every provider in each precision, side by side, autocast on
    # fp32 layers. Read here before model_bench fills its own default: without the flag, --dtypes alone applies.
    args.layer_precisions = BC.csv_list(args.precisions) if isinstance(args.precisions, str) else None
    if args.layer_precisions:
        bad = [p for p in args.layer_precisions if p not in BC.PRECISIONS]
        if bad:
            ap.error(f"--precisions: unknown {bad}; choose from {list(BC.PRECISIONS)}")
        if args.dtypes != ["fp32"]:
            ap.error("--precisions runs fp32 layers under autocast in each precision; leave --dtypes at fp32")
    for flag, values, known in (("nets", args.nets, SHAPES), ("layers", args.layers, SHAPES["vit_s"]),
                                ("modes", args.modes, MODES), ("dtypes", args.dtypes, DTYPES)):
        for v in values:
            if v not in known:
                ap.error(f"--{flag}: unknown {v!r}; choose from {list(known)}")


def run(args, records: list, log=print) -> None:
    """Measure every selected case; appends to `records` as it goes (an interrupted run keeps them)."""
    wanted = BC.csv_list(args.providers) or all_providers(args.device)
    if args.quick and not args.providers:
        wanted = [p for p in wanted if p != "naive_compile"]  # its first compile alone takes ~20 s on 2 cores
    unknown = [p for p in wanted if p not in known_providers()]
    if unknown:
        print(f"unknown or unavailable layer providers {unknown}; available: {known_providers()}")
        raise SystemExit(2)
    skip = set(BC.csv_list(args.skip_providers))
    providers = [p for p in wanted if p not in skip]
    if getattr(args, "cases", None):
        cases = [Case(n, lay, b, m, dt) for dt in args.dtypes for n, lay, b, m in args.cases]
    else:
        cases = [Case(n, lay, b, m, dt) for dt in args.dtypes for n in args.nets for b in args.batches
                 for lay in args.layers for m in args.modes]
    precisions = getattr(args, "layer_precisions", None)
    if precisions:
        precisions = BC.usable_precisions(precisions, args.device, log)
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        recs = run_case(case, args.device, providers, args.rounds, args.min_block_s, args.warmup,
                        min_rounds=args.min_rounds, max_case_s=args.max_case_s, memory=not args.no_memory, log=log,
                        precisions=precisions)
        records += recs
        for auto in (r for r in recs if r.provider == "fused_auto"):
            log(f"[{i + 1}/{len(cases)}] {case.name} b{case.batch} {case.mode} {auto.dtype}: "
                + " ".join(f"{report.short(r.provider)}={BC.fmt(r.median_ms)}" for r in recs if r.dtype == auto.dtype)
                + f"  auto/base={BC.fmt(auto.ratio_vs_baseline, 2)} ref/auto={BC.fmt(auto.speedup_vs_reference, 2)}"
                + (f" fp32/auto={BC.fmt(auto.speedup_vs_fp32, 2)}" if not math.isnan(auto.speedup_vs_fp32) else "")
                + f"  ({time.perf_counter() - t0:.1f}s)")



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    BC.add_common_args(ap)
    add_args(ap)
    args = ap.parse_args(argv)
    BC.resolve_common(args, ap)
    resolve(args, ap)
    return report.run(args, [lambda records, log: run(args, records, log)], "layer")


if __name__ == "__main__":
    sys.exit(main())
