#!/usr/bin/env python
"""Per-sample codes (docs/design.md section 8): what many streams in one batch cost.

    python benchmarks/streams_bench.py             # layer level: ViT-S layers at batch 64, K = 16 streams
    python benchmarks/streams_bench.py --quick     # smoke run, seconds

Layer level, forward + backward with the codes trained and dx needed, at the same N (batch × 197 tokens):
  one_code   FusedSpectralLinear with its single s (what one stream of that total batch costs; the
             planner may pick route R, which a (K, r) table cannot use without K recompositions)
  one_code_F the same with the route pinned to F, the route the codes take (isolates the gather cost)
  codes      the same layer with a (K, r) table, each sample using its stream's row (stream_codes)
  loop       the PEFT way: one call per stream on that stream's samples, each with its own s
The ratios are medians of ratios measured side by side (codes/one_code is the overhead of the index).
Writes benchmarks/results/streams_<machine>[_quick].{json,txt}.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import bench_common as BC
from bench_common import load1, measure_interleaved, paired_ratio

import torch
from torch import nn

from imse_kernels import FusedSpectralLinear, stream_codes
from imse_kernels.ops import force_route

TOKENS = 197
VIT_S = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}


class _One(nn.Module):
    """One spectral layer as a model, so `stream_codes` can scope it."""

    def __init__(self, layer: FusedSpectralLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def layer_case(d_in: int, d_out: int, batch: int, k: int, seed: int = 0) -> dict:
    """name -> zero-argument callable running one forward + backward of each provider."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))
    one = _One(FusedSpectralLinear.from_linear(linear))
    coded = _One(FusedSpectralLinear.from_linear(linear))
    coded.layer.enable_codes(k)
    x = torch.randn(batch, TOKENS, d_in, generator=g, requires_grad=True)
    grad = torch.randn(batch, TOKENS, d_out, generator=g)
    streams = torch.randint(0, k, (batch,), generator=g)
    groups = [torch.nonzero(streams == c).flatten() for c in range(k)]
    loop_layers = [FusedSpectralLinear.from_linear(linear) for _ in range(k)]

    def one_code():
        y = one(x)
        return torch.autograd.grad(y, (x, one.layer.s), grad)

    def one_code_F():
        with force_route("factorized"):
            return one_code()

    def codes():
        with stream_codes(coded, streams):
            y = coded(x)
        return torch.autograd.grad(y, (x, coded.layer.codes), grad)

    def loop():
        out = []
        for c, rows in enumerate(groups):
            if rows.numel():
                y = loop_layers[c](x[rows])
                out.append(torch.autograd.grad(y, (x, loop_layers[c].s), grad[rows]))
        return out

    return {"one_code": one_code, "one_code_F": one_code_F, "codes": codes, "loop": loop}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    BC.add_common_args(ap)
    ap.add_argument("--layers", default=None, help="ViT-S layers (default qkv,proj,fc1,fc2)")
    ap.add_argument("--batches", default=None, help="default 64,16")
    ap.add_argument("--streams", default=None, help="K values (default 16)")
    args = ap.parse_args(argv)
    BC.resolve_common(args, ap)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = BC.csv_list(args.layers or ("proj" if args.quick else "qkv,proj,fc1,fc2"))
    batches = [int(b) for b in BC.csv_list(args.batches or ("4" if args.quick else "64,16"))]
    ks = [int(k) for k in BC.csv_list(args.streams or ("2" if args.quick else "16"))]
    env = BC.env_info(args.device)
    print(BC.install_banner(env["install"]), flush=True)
    rows, t0 = [], time.perf_counter()
    for batch in batches:
        for k in ks:
            for name in layers:
                d_in, d_out = VIT_S[name]
                fns = layer_case(d_in, d_out, batch, k)
                t = measure_interleaved(fns, args.device, args.rounds, args.min_block_s, args.warmup,
                                        min_rounds=args.min_rounds, max_case_s=args.max_case_s)
                row = {"layer": f"vit_s.{name}", "batch": batch, "tokens": batch * TOKENS, "streams": k,
                       "one_code_ms": t["one_code"].median() * 1e3, "one_code_F_ms": t["one_code_F"].median() * 1e3,
                       "codes_ms": t["codes"].median() * 1e3, "loop_ms": t["loop"].median() * 1e3,
                       "codes_over_one_code": paired_ratio(t["codes"], t["one_code"]),
                       "codes_over_one_code_F": paired_ratio(t["codes"], t["one_code_F"]),
                       "loop_over_codes": paired_ratio(t["loop"], t["codes"]), "load1": load1()}
                rows.append(row)
                print(f"  {row['layer']} b{batch} K={k}: one_code {BC.fmt(row['one_code_ms'])} ms, codes "
                      f"{BC.fmt(row['codes_ms'])} ms, loop {BC.fmt(row['loop_ms'])} ms; codes/one_code "
                      f"{BC.fmt(row['codes_over_one_code'], 2)}, codes/one_code_F {BC.fmt(row['codes_over_one_code_F'], 2)}, "
                      f"loop/codes {BC.fmt(row['loop_over_codes'], 2)}",
                      flush=True)
    lines = [f"streams_bench on {BC.machine_tag(args.device)}, fp32, fwd+bwd (codes trained, dx needed); "
             f"medians of paired ratios; total {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f} at end",
             "layer          batch  K   one_code ms  codes ms  loop ms  codes/one_code  codes/one_code_F  loop/codes"]
    lines += [f"{r['layer']:<14} {r['batch']:>5} {r['streams']:>3} {r['one_code_ms']:>11.3f} {r['codes_ms']:>9.3f} "
              f"{r['loop_ms']:>8.3f} {r['codes_over_one_code']:>15.2f} {r['codes_over_one_code_F']:>17.2f} "
              f"{r['loop_over_codes']:>11.2f}" for r in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_save:
        out = Path(args.out_dir) if args.out_dir else BC.RESULTS_DIR
        stem = f"streams_{args.tag or BC.machine_tag(args.device)}" + ("_quick" if args.quick else "")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "layer": rows}, indent=1, default=str))
        (out / f"{stem}.txt").write_text(BC.install_banner(env["install"]) + "\n" + text + "\n")
        print(f"wrote {out / stem}.json, .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
