#!/usr/bin/env python
"""Per-sample codes (docs/design.md section 8): what many streams in one batch cost.

    python benchmarks/streams_bench.py                 # layer level: ViT-S layers, K = 16 streams
    python benchmarks/streams_bench.py --level model   # model level: MultiStreamIMSE steps on ViT-S/16
    python benchmarks/streams_bench.py --quick         # smoke run of both, seconds

Layer level, forward + backward with the codes trained and dx needed, at the same N (batch × 197 tokens):
  one_code   FusedSpectralLinear with its single s (what one stream of that total batch costs; the
             planner may pick route R, which a (K, r) table cannot use without K recompositions)
  one_code_F the same with the route pinned to F, the route the codes take (isolates the gather cost)
  codes      the same layer with a (K, r) table, each sample using its stream's row (stream_codes)
  loop       the PEFT way: one call per stream on that stream's samples, each with its own s
The ratios are medians of ratios measured side by side (codes/one_code is the overhead of the index).

Model level, one adaptation step each (IMSE: SAM's two forward+backward passes), fp32, ViT-S/16:
  imse_b<n>        one IMSE step on n images (the per-image cost by batch size shows where batching
                   stops paying on this machine)
  multi_<K>x<b>    one MultiStreamIMSE step over K streams of b images each (K·b images)
  separate_<K>x<b> K IMSE steps of b images each, one adapter per stream (the same work, unbatched)
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
import torch
from bench_common import load1, measure_interleaved, paired_ratio
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


def model_cases(args) -> tuple[list, list]:
    """(IMSE batch sizes for the per-image table, (K, b) stream layouts)."""
    batches = BC.csv_list(args.model_batches) or ([2, 4] if args.quick else [1, 8, 16, 64])
    layouts = BC.csv_list(args.layouts) or (["2x1", "2x2"] if args.quick else ["16x1", "8x8"])
    return [int(b) for b in batches], [tuple(int(v) for v in lay.split("x")) for lay in layouts]


def model_level(args, log=print) -> list:
    """Per-image step cost by batch size, then each (K, b) layout against IMSE at K·b and K separate steps."""
    import copy

    from model_bench import make_model

    from imse_kernels import IMSE, IMSEConfig, MultiStreamIMSE

    name = "vit_tiny" if args.quick else "vit_small"
    base = make_model(name, args.device, depth=4 if args.quick else None, img_size=32 if args.quick else None)
    size = tuple(base.patch_embed.img_size)
    cfg = IMSEConfig(retrieval="none")  # the step itself; no shift is staged here
    batches, layouts = model_cases(args)
    g = torch.Generator().manual_seed(0)
    rows = []

    def imse_fn(n):
        adapter, x = IMSE(copy.deepcopy(base), cfg), torch.randn(n, 3, *size, generator=g)
        return lambda: adapter(x)

    per_image = {}
    fns = {f"imse_b{n}": imse_fn(n) for n in batches}
    t = measure_interleaved(fns, args.device, args.rounds, args.min_block_s, args.warmup,
                            min_rounds=args.min_rounds, max_case_s=args.max_case_s)
    for n in batches:
        per_image[n] = t[f"imse_b{n}"].median() / n * 1e3
        rows.append({"level": "model", "provider": f"imse_b{n}", "images": n,
                     "ms_per_step": t[f"imse_b{n}"].median() * 1e3, "ms_per_image": per_image[n], "load1": load1()})
        log(f"  IMSE step b{n}: {per_image[n]:.1f} ms per image")
    for k, b in layouts:
        total = k * b
        x = torch.randn(total, 3, *size, generator=g)
        streams = torch.arange(k).repeat_interleave(b)
        multi = MultiStreamIMSE(copy.deepcopy(base), k, cfg)
        separate = [IMSE(copy.deepcopy(base), cfg) for _ in range(k)]
        chunks = [x[streams == c] for c in range(k)]
        fns = {"multi": lambda multi=multi, x=x, streams=streams: multi(x, streams),
               "separate": lambda separate=separate, chunks=chunks: [a(c) for a, c in zip(separate, chunks)]}
        fns["imse"] = imse_fn(total)
        t = measure_interleaved(fns, args.device, args.rounds, args.min_block_s, args.warmup,
                                min_rounds=args.min_rounds, max_case_s=args.max_case_s)
        row = {"level": "model", "provider": f"multi_{k}x{b}", "streams": k, "per_stream": b, "images": total,
               "ms_per_step": t["multi"].median() * 1e3, "ms_per_image": t["multi"].median() / total * 1e3,
               "imse_same_total_ms": t["imse"].median() * 1e3, "separate_ms": t["separate"].median() * 1e3,
               "multi_over_imse": paired_ratio(t["multi"], t["imse"]),
               "separate_over_multi": paired_ratio(t["separate"], t["multi"]), "load1": load1()}
        rows.append(row)
        log(f"  {k} streams x {b}: multi {BC.fmt(row['ms_per_step'])} ms, "
            f"IMSE b{total} {BC.fmt(row['imse_same_total_ms'])} ms, "
            f"{k} separate {BC.fmt(row['separate_ms'])} ms; multi/IMSE {BC.fmt(row['multi_over_imse'], 2)}, "
            f"separate/multi {BC.fmt(row['separate_over_multi'], 2)}")
    return rows


def model_text(rows: list) -> list:
    per = [r for r in rows if "streams" not in r]
    lines = ["IMSE step cost per image by batch size: "
             + ", ".join(f"b{r['images']} {r['ms_per_image']:.1f} ms" for r in per)]
    best = min(per, key=lambda r: r["ms_per_image"])
    lines.append(f"batching pays up to batch {best['images']} here (the cheapest per image); beyond it the "
                 "adapter's max_group_samples knob splits a mixed batch into groups of whole streams")
    lines.append("layout      images  multi ms  IMSE same-total ms  separate ms  multi/IMSE  separate/multi")
    lines += [f"{r['streams']:>3} x {r['per_stream']:<3} {r['images']:>8} {r['ms_per_step']:>9.1f} "
              f"{r['imse_same_total_ms']:>19.1f} {r['separate_ms']:>12.1f} {r['multi_over_imse']:>11.2f} "
              f"{r['separate_over_multi']:>15.2f}" for r in rows if "streams" in r]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    BC.add_common_args(ap)
    ap.add_argument("--layers", default=None, help="ViT-S layers (default qkv,proj,fc1,fc2)")
    ap.add_argument("--batches", default=None, help="default 64,16")
    ap.add_argument("--streams", default=None, help="K values (default 16)")
    ap.add_argument("--model-batches", default=None, help="model level: IMSE batch sizes (default 1,8,16,64)")
    ap.add_argument("--layouts", default=None, help="model level: KxB stream layouts (default 16x1,8x8)")
    ap.add_argument("--level", default=None, help="layer, model or layer,model (default layer; --quick: both)")
    args = ap.parse_args(argv)
    BC.resolve_common(args, ap)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = BC.csv_list(args.layers or ("proj" if args.quick else "qkv,proj,fc1,fc2"))
    batches = [int(b) for b in BC.csv_list(args.batches or ("4" if args.quick else "64,16"))]
    ks = [int(k) for k in BC.csv_list(args.streams or ("2" if args.quick else "16"))]
    env = BC.env_info(args.device)
    print(BC.install_banner(env["install"]), flush=True)
    levels = BC.csv_list(args.level or ("layer,model" if args.quick else "layer"))
    rows, model_rows, t0 = [], [], time.perf_counter()
    for batch in (batches if "layer" in levels else []):
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
                      f"{BC.fmt(row['codes_over_one_code'], 2)}, "
                      f"codes/one_code_F {BC.fmt(row['codes_over_one_code_F'], 2)}, "
                      f"loop/codes {BC.fmt(row['loop_over_codes'], 2)}",
                      flush=True)
    lines = ["Layer level, fwd+bwd (codes trained, dx needed)",
             "layer          batch  K   one_code ms  codes ms  loop ms  codes/one_code  codes/one_code_F  loop/codes"]
    lines += [f"{r['layer']:<14} {r['batch']:>5} {r['streams']:>3} {r['one_code_ms']:>11.3f} {r['codes_ms']:>9.3f} "
              f"{r['loop_ms']:>8.3f} {r['codes_over_one_code']:>15.2f} {r['codes_over_one_code_F']:>17.2f} "
              f"{r['loop_over_codes']:>11.2f}" for r in rows]
    if "layer" not in levels:
        lines = []
    if "model" in levels:
        model_rows = model_level(args)
        model = "a 4-block ViT-Tiny at 32 px (--quick)" if args.quick else "ViT-S/16 at 224 px"
        lines += ["", f"Model level, {model}, IMSE steps (SAM: two forward+backward passes)"] + model_text(model_rows)
    lines.insert(0, f"streams_bench on {BC.machine_tag(args.device)}, fp32; medians of paired ratios; total "
                    f"{time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f} at end")
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_save:
        out = Path(args.out_dir) if args.out_dir else BC.RESULTS_DIR
        stem = f"streams_{args.tag or BC.machine_tag(args.device)}" + ("_quick" if args.quick else "")
        out.mkdir(parents=True, exist_ok=True)
        stem += "" if levels == ["layer"] else "_" + "_".join(levels)
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "layer": rows, "model": model_rows}, indent=1,
                                                     default=str))
        (out / f"{stem}.txt").write_text(BC.install_banner(env["install"]) + "\n" + text + "\n")
        print(f"wrote {out / stem}.json, .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
