#!/usr/bin/env python
"""Correctness of each spectral backend against a float64 oracle: one JSON line per check.

    python checks/gpu_correctness.py --device cuda                      # triton and cuda, full sweep
    python checks/gpu_correctness.py --device cpu --backends torch,cpu --quick
    python checks/gpu_correctness.py --device cpu --backends cpu --quick --inject-fault scale   # must fail
    python checks/gpu_correctness.py --device cuda --backends triton --dtypes bf16 --shard 0/8  # 1 of 8 warm-ups

Every primitive of the backend protocol (imse_kernels/backends/base.py) and the public
`spectral_linear` (forward + backward under `use_backend(name)`, both routes pinned with
`force_route`) run in bf16, fp16, fp32 (IEEE) and fp32 with TF32 (cuda only) over odd shapes,
truncated ranks, transposed / strided / storage-offset-1 inputs, plus bitwise determinism of ds.

Each primitive gets fixed inputs in the tested dtype; the oracle is the torch backend run in float64
on the same (rounded) inputs, so only the backend's own arithmetic is measured. Error of an output:
max|out - oracle| / max|oracle| (relative to the oracle's magnitude); a check passes when every
output's error is <= the dtype's tolerance (TOL) and dtypes, shapes and None-outputs are right.
TOL: fp32 IEEE 1e-4 (K <= 3072 fp32 sums stay near 1e-6); TF32 5e-3 (10-bit mantissa inputs);
bf16 3e-2 and fp16 5e-3 (8- and 11-bit intermediates such as h, one rounding each); these match
tests/cuda_memcheck_case.py up to fp32, which is looser here to cover every backend.
Triton runs with IMSE_TRITON_TUNE=0 unless --tune: its shape heuristic picks the variant (fused at
small N, split at large N, so the N sweep reaches both) and no time goes to timing candidates.

Output: JSON lines on stdout and in --out: a header (versions, backends, extension status), one
line per check {"backend","primitive","dtype","shape","max_abs_err","max_rel_err","tol","ok",
"error","seconds",...}, and a last {"summary": true, "checks", "passed", "failed", "errors"}.
An exception inside a check is recorded as its error; the driver never stops early (except at
--budget-s, when the summary says "truncated"). Exit code 0 when every check passed.
"""
import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Optional

import torch

TOL = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2, "fp16": 5e-3}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ORDER = ("bf16", "fp32", "tf32", "fp16")  # most used first: a killed run has the headline dtype

# (N, d_in, d_out, r): N = 1, 3, a ViT image (197 tokens), 1000; ViT-S qkv, odd tiny, ViT-B fc1/fc2,
# and truncated ranks (17x33 r=5, 768x3072 r=100).
LAYERS_FULL = [(384, 1152, 384), (17, 33, 5), (768, 3072, 768), (3072, 768, 768), (768, 3072, 100)]
SHAPES_FULL = [(n, *layer) for layer in LAYERS_FULL for n in (1, 3, 197, 1000)]
# Checked first (every dtype), so that a run stopped by --budget-s still covers N = 1, 3, 197, 1000,
# an odd and a truncated shape and ViT-B fc1/fc2 on every backend.
FIRST_FULL = [(197, 768, 3072, 768), (1000, 3072, 768, 768), (1, 384, 1152, 384), (3, 17, 33, 5),
              (1000, 768, 3072, 100)]
LAYOUT_SHAPES_FULL = [(3, 17, 33, 5), (197, 384, 1152, 384), (1000, 768, 3072, 100)]
DET_SHAPES_FULL = [(1000, 768, 3072, 768), (197, 3072, 768, 768)]
# --quick: seconds on two CPU cores (fp16 GEMMs are slow there), still N = 1, odd sizes, truncated rank.
SHAPES_QUICK = [(1, 17, 33, 5), (3, 64, 96, 24), (197, 48, 40, 17)]
FIRST_QUICK = SHAPES_QUICK
LAYOUT_SHAPES_QUICK = [(3, 17, 33, 5), (197, 48, 40, 17)]
DET_SHAPES_QUICK = [(197, 48, 40, 17)]
LAYOUTS = ("transposed", "strided", "offset1")


def work_list(quick: bool, dtypes: list[str]) -> list[tuple[str, tuple, str, str]]:
    """(dtype, shape, layout, kind) in order of value: the first shapes in every dtype, determinism,
    the other shapes, transposed / strided inputs, and misaligned (offset 1) inputs last: a kernel
    that faults on them (a sticky CUDA error) cannot take the other checks with it."""
    first, shapes = (FIRST_QUICK, SHAPES_QUICK) if quick else (FIRST_FULL, SHAPES_FULL)
    layouts = LAYOUT_SHAPES_QUICK if quick else LAYOUT_SHAPES_FULL
    det = DET_SHAPES_QUICK if quick else DET_SHAPES_FULL
    tiers = [[(sh, "contiguous", "values") for sh in first],
             [(sh, "contiguous", "determinism") for sh in det],
             [(sh, "contiguous", "values") for sh in shapes if sh not in first],
             [(sh, lay, "values") for lay in LAYOUTS[:-1] for sh in layouts],
             [(sh, LAYOUTS[-1], "values") for sh in layouts]]
    return [(d, sh, lay, kind) for tier in tiers for d in dtypes for (sh, lay, kind) in tier]


FAULT_PRIMITIVE = "factorized_forward"


# ------------------------------------------------------------------------------------------------
# Output

class Recorder:
    """Writes each record as one JSON line to stdout and the --out file (flushed per line)."""

    def __init__(self, path: Optional[str]):
        self.file = open(path, "a", buffering=1) if path else None
        self.checks = self.passed = self.failed = self.errors = 0
        self.failures: list[dict] = []
        self.by_backend: dict[str, dict] = {}

    def emit(self, rec: dict) -> None:
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def check(self, rec: dict) -> None:
        self.checks += 1
        outcome = "errors" if rec["error"] is not None else ("passed" if rec["ok"] else "failed")
        setattr(self, outcome, getattr(self, outcome) + 1)
        if outcome != "passed":
            self.failures.append(rec)
        counts = self.by_backend.setdefault(rec["backend"], {"checks": 0, "passed": 0, "failed": 0, "errors": 0})
        counts["checks"] += 1
        counts[outcome] += 1
        self.emit(rec)


def header(device: torch.device, backends: list[str], args) -> dict:
    import imse_kernels
    from imse_kernels import _extension
    from imse_kernels.backends import backend_status

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "header": True, "imse_kernels": imse_kernels.__file__, "version": imse_kernels.__version__,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton_version, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "extension_C": _extension.reason("_C") or "loaded",
        "extension_C_cuda": (_extension.reason("_C_cuda") or "loaded") if device.type == "cuda" else None,
        "backend_status": {k: v or "available" for k, v in backend_status().items()},
        "backends": backends, "quick": args.quick, "dtypes": args.dtypes, "tol": TOL,
        "triton_tuning": bool(args.tune), "inject_fault": args.inject_fault, "shard": args.shard,
    }


# ------------------------------------------------------------------------------------------------
# Inputs, layouts, errors

def make_inputs(n, d_in, d_out, r, dtype, device, seed):
    """x, U, s (float32), Vh, bias, grad in `dtype`, drawn in float64 on the CPU (device independent)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(n, d_in)
    U = rnd(d_out, r, scale=d_out ** -0.5)
    Vh = rnd(r, d_in, scale=d_in ** -0.5)
    s = (torch.rand(r, generator=g, dtype=torch.float64) * 2 + 0.25).float().to(device)
    bias = rnd(d_out, scale=0.5)
    grad = rnd(n, d_out)
    return x, U, s, Vh, bias, grad


def relayout(t: Optional[torch.Tensor], layout: str) -> Optional[torch.Tensor]:
    """The same values in another memory layout: a transposed view (2-D), every other column of a
    wider buffer, or a view starting one element into its storage (misaligned)."""
    if t is None or layout == "contiguous":
        return t
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided" and t.dim() == 2:
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout in ("offset1", "transposed", "strided"):  # 1-D tensors get the offset view
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view
    raise ValueError(layout)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if ref.numel() == 0:
        return 0.0, 0.0
    abs_err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    if abs_err != abs_err:  # NaN in the output
        return float("inf"), float("inf")
    return abs_err, abs_err / max(scale, 1e-30)


class Oracle:
    """float64 results of the torch backend for one (dtype, shape) input set."""

    def __init__(self, x, U, s, Vh, bias, grad):
        from imse_kernels.backends.torch_backend import TorchBackend

        tb = TorchBackend()
        d = lambda t: t.detach().double()  # noqa: E731
        x64, U64, s64, Vh64, b64, g64 = map(d, (x, U, s, Vh, bias, grad))
        self.y, self.h = tb.factorized_forward(x64, U64, s64, Vh64, b64, True)
        self.y_nobias = tb.factorized_forward(x64, U64, s64, Vh64, None, False)[0]
        self.W = tb.recompose(U64, s64, Vh64)
        # inputs of the backward primitives in the tested dtype (what a forward in that dtype saves)
        self.h_in = self.h.to(x.dtype)
        self.W_in = self.W.to(x.dtype)
        self.dx, self.ds = tb.factorized_backward(g64, self.h_in.double(), U64, s64, Vh64, True)
        self.dx_input = tb.factorized_input_grad(g64, U64, s64, Vh64)
        self.dx_rec, self.ds_rec = tb.recomposed_backward(g64, x64, U64, s64, Vh64, self.W_in.double(), True)
        # end to end: exact math on the rounded inputs
        self.sl_dx, self.sl_ds = tb.factorized_backward(g64, self.h, U64, s64, Vh64, True)
        self.sl_db = g64.sum(0)


# ------------------------------------------------------------------------------------------------
# Checks

def _expect(outputs: dict, expected: dict, dtypes: dict, nones: dict) -> tuple[dict, list[str]]:
    """Errors per output and a list of contract violations (wrong dtype/shape/None-ness)."""
    per, problems = {}, []
    for name, value in nones.items():
        if value is not None:
            problems.append(f"{name} should be None, got {type(value).__name__}")
    for name, ref in expected.items():
        out = outputs.get(name)
        if out is None:
            problems.append(f"{name} is None")
            continue
        if tuple(out.shape) != tuple(ref.shape):
            problems.append(f"{name} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
            continue
        if out.dtype != dtypes[name]:
            problems.append(f"{name} has dtype {out.dtype}, expected {dtypes[name]}")
        per[name] = errors(out, ref)
    return per, problems


def primitive_checks(backend, inp: tuple, orc: Oracle, dtype: torch.dtype, layout: str) -> list[tuple[str, Callable]]:
    """(name, fn) pairs; fn() returns (outputs, expected, dtypes, nones) for `_expect`."""
    x, U, s, Vh, bias, grad = (relayout(t, layout) for t in inp)
    h_in, W_in = relayout(orc.h_in, layout), relayout(orc.W_in, layout)
    sd = s.dtype

    def ff(save_h, with_bias):
        def run():
            y, h = backend.factorized_forward(x, U, s, Vh, bias if with_bias else None, save_h)
            exp = {"y": orc.y if with_bias else orc.y_nobias}
            out = {"y": y}
            if save_h:
                exp["h"], out["h"] = orc.h, h
            return out, exp, {"y": dtype, "h": dtype}, ({} if save_h else {"h": h})
        return run

    def recompose():
        return {"W": backend.recompose(U, s, Vh)}, {"W": orc.W}, {"W": dtype}, {}

    def fb(need_dx):
        def run():
            dx, ds = backend.factorized_backward(grad, h_in, U, s, Vh, need_dx)
            out, exp = {"ds": ds}, {"ds": orc.ds}
            if need_dx:
                out["dx"], exp["dx"] = dx, orc.dx
            return out, exp, {"dx": dtype, "ds": sd}, ({} if need_dx else {"dx": dx})
        return run

    def fig():
        return {"dx": backend.factorized_input_grad(grad, U, s, Vh)}, {"dx": orc.dx_input}, {"dx": dtype}, {}

    def rb(need_dx):
        def run():
            dx, ds = backend.recomposed_backward(grad, x, U, s, Vh, W_in, need_dx)
            out, exp = {"ds": ds}, {"ds": orc.ds_rec}
            if need_dx:
                out["dx"], exp["dx"] = dx, orc.dx_rec
            return out, exp, {"dx": dtype, "ds": sd}, ({} if need_dx else {"dx": dx})
        return run

    def sl(route):
        def run():
            from imse_kernels import spectral_linear, use_backend
            from imse_kernels.ops import force_route

            xl = x.detach().requires_grad_()
            sl_ = s.detach().clone().requires_grad_()
            bl = bias.detach().clone().requires_grad_()
            with use_backend(backend.name), force_route(route):
                y = spectral_linear(xl, U, sl_, Vh, bl)
                y.backward(grad)
            out = {"y": y, "dx": xl.grad, "ds": sl_.grad, "dbias": bl.grad}
            exp = {"y": orc.y, "dx": orc.sl_dx, "ds": orc.sl_ds, "dbias": orc.sl_db}
            return out, exp, {"y": dtype, "dx": dtype, "ds": sd, "dbias": dtype}, {}
        return run

    return [
        ("factorized_forward(save_h=1,bias=1)", ff(True, True)),
        ("factorized_forward(save_h=0,bias=1)", ff(False, True)),
        ("factorized_forward(save_h=1,bias=0)", ff(True, False)),
        ("recompose", recompose),
        ("factorized_backward(need_dx=1)", fb(True)),
        ("factorized_backward(need_dx=0)", fb(False)),
        ("factorized_input_grad", fig),
        ("recomposed_backward(need_dx=1)", rb(True)),
        ("recomposed_backward(need_dx=0)", rb(False)),
        ("spectral_linear(route=factorized)", sl("factorized")),
        ("spectral_linear(route=recomposed)", sl("recomposed")),
    ]


def determinism_checks(backend, inp: tuple, orc: Oracle) -> list[tuple[str, Callable]]:
    """(name, fn): fn() returns two ds from identical calls; they must be bitwise equal."""
    x, U, s, Vh, bias, grad = inp

    def fb():
        return [backend.factorized_backward(grad, orc.h_in, U, s, Vh, True)[1] for _ in range(2)]

    def rb():
        return [backend.recomposed_backward(grad, x, U, s, Vh, orc.W_in, True)[1] for _ in range(2)]

    def sl(route):
        def run():
            from imse_kernels import spectral_linear, use_backend
            from imse_kernels.ops import force_route

            out = []
            for _ in range(2):
                s_ = s.detach().clone().requires_grad_()
                with use_backend(backend.name), force_route(route):
                    spectral_linear(x, U, s_, Vh, bias).backward(grad)
                out.append(s_.grad)
            return out
        return run

    return [("determinism(factorized_backward.ds)", fb), ("determinism(recomposed_backward.ds)", rb),
            ("determinism(spectral_linear.ds,route=factorized)", sl("factorized")),
            ("determinism(spectral_linear.ds,route=recomposed)", sl("recomposed"))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_check(rec: Recorder, device, base: dict, fn: Callable, tol: float, fault: float, kind: str) -> None:
    t0 = time.perf_counter()
    record = dict(base, max_abs_err=None, max_rel_err=None, tol=tol, ok=False, error=None)
    try:
        if kind == "determinism":
            a, b = fn()
            sync(device)
            record["max_abs_err"] = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            record["max_rel_err"] = record["max_abs_err"]
            record["tol"] = 0.0
            record["ok"] = bool(torch.equal(a, b))
        else:
            outputs, expected, dtypes, nones = fn()
            if fault and "y" in outputs and outputs["y"] is not None:
                outputs["y"] = outputs["y"] * fault
            sync(device)
            per, problems = _expect(outputs, expected, dtypes, nones)
            record["outputs"] = {k: v[1] for k, v in per.items()}
            record["max_abs_err"] = max((v[0] for v in per.values()), default=None)
            record["max_rel_err"] = max((v[1] for v in per.values()), default=None)
            bad = [k for k, v in per.items() if not v[1] <= tol]
            if problems:
                record["problems"] = problems
            record["ok"] = not problems and not bad
    except Exception as exc:  # recorded, never fatal
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=-3)
    record["seconds"] = round(time.perf_counter() - t0, 4)
    rec.check(record)


# ------------------------------------------------------------------------------------------------
# Driver

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backends", default=None,
                    help="comma list (default: the available ones of triton,cuda on cuda; torch,cpu on cpu)")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16,fp32,tf32,fp16 (tf32 needs cuda; default all)")
    ap.add_argument("--quick", action="store_true", help="a handful of small shapes")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--budget-s", type=float, default=None, help="start no check after this many seconds")
    ap.add_argument("--tune", action="store_true", help="let the triton backend time its variants (default: "
                    "IMSE_TRITON_TUNE=0, the shape heuristic picks; N sweeps reach both fused and split)")
    ap.add_argument("--inject-fault", choices=["none", "scale"], default="none",
                    help=f"scale: multiply y of every {FAULT_PRIMITIVE} check by 1 + max(0.01, 2*tol), so "
                    "exactly those checks must fail (proves the checker can fail)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", default=None, metavar="K/P",
                    help="run only the cases whose position in the work list is K modulo P (the same inputs as "
                         "the whole sweep): P processes with K = 0..P-1 compile every Triton specialisation in "
                         "parallel, which warms the on-disk cache for a later full run")
    args = ap.parse_args(argv)
    if args.shard is not None:
        try:
            k, p = (int(v) for v in args.shard.split("/"))
            assert 0 <= k < p
        except (ValueError, AssertionError):
            ap.error(f"--shard: expected K/P with 0 <= K < P, got {args.shard!r}")
        args.shard = (k, p)
    args.dtypes = [d.strip() for d in (args.dtypes or ",".join(DTYPE_ORDER)).split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False (use --device cpu)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.tune:
        os.environ["IMSE_TRITON_TUNE"] = "0"
    import imse_kernels  # noqa: F401  (the installed package)
    from imse_kernels.backends import available_backends, get_backend

    device = torch.device(args.device)
    rec = Recorder(args.out)
    avail = available_backends()
    if args.backends is None:
        wanted = [b for b in (("triton", "cuda") if device.type == "cuda" else ("torch", "cpu")) if b in avail]
    else:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    dtypes = [d for d in args.dtypes if d != "tf32" or device.type == "cuda"]
    rec.emit(header(device, wanted, args))
    t_start = time.perf_counter()
    truncated = False

    backends = {}
    for name in wanted:
        try:
            b = get_backend(name)
            if not b.supports(device):
                raise RuntimeError(f"backend {name!r} cannot run on {device}")
            backends[name] = b
        except Exception as exc:
            rec.check({"backend": name, "primitive": "availability", "dtype": None, "shape": None,
                       "max_abs_err": None, "max_rel_err": None, "tol": None, "ok": False,
                       "error": f"{type(exc).__name__}: {exc}", "seconds": 0.0})

    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        def over_budget() -> bool:
            return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

        for i, (dname, shape, layout, kind) in enumerate(work_list(args.quick, dtypes)):
            if args.shard is not None and i % args.shard[1] != args.shard[0]:
                continue
            if over_budget():
                truncated = True
                break
            dtype, tol = DTYPES[dname], TOL[dname]
            torch.backends.cuda.matmul.allow_tf32 = dname == "tf32"
            fault = (1.0 + max(0.01, 2 * tol)) if args.inject_fault == "scale" else 0.0
            try:
                inp = make_inputs(*shape, dtype, device, seed=args.seed + i)
                orc = Oracle(*inp)
            except Exception as exc:
                rec.check({"backend": "oracle", "primitive": "inputs", "dtype": dname, "shape": list(shape),
                           "layout": layout, "max_abs_err": None, "max_rel_err": None, "tol": tol, "ok": False,
                           "error": f"{type(exc).__name__}: {exc}", "seconds": 0.0})
                continue
            for bname, backend in backends.items():
                if over_budget():
                    break
                base = {"backend": bname, "dtype": dname, "shape": list(shape), "layout": layout}
                if kind == "determinism":
                    for pname, fn in determinism_checks(backend, inp, orc):
                        run_check(rec, device, dict(base, primitive=pname), fn, 0.0, 0.0, kind)
                    continue
                for pname, fn in primitive_checks(backend, inp, orc, dtype, layout):
                    f = fault if pname.startswith(FAULT_PRIMITIVE) else 0.0
                    run_check(rec, device, dict(base, primitive=pname), fn, tol, f, kind)
            del inp, orc
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32

    summary = {"summary": True, "checks": rec.checks, "passed": rec.passed, "failed": rec.failed,
               "errors": rec.errors, "seconds": round(time.perf_counter() - t_start, 2), "truncated": truncated,
               "by_backend": rec.by_backend}
    rec.emit(summary)
    for f in rec.failures[:40]:
        print(f"FAIL {f['backend']} {f['primitive']} {f['dtype']} {f['shape']} {f.get('layout', '')}: "
              f"rel {f['max_rel_err']} tol {f['tol']} {f.get('problems') or ''} {f['error'] or ''}", file=sys.stderr)
    print(f"gpu_correctness: {rec.passed}/{rec.checks} passed, {rec.failed} failed, {rec.errors} errors"
          f"{' (truncated at --budget-s)' if truncated else ''}", file=sys.stderr)
    return 0 if rec.failed == 0 and rec.errors == 0 and rec.checks > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
