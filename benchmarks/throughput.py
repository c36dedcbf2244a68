#!/usr/bin/env python
"""Speed and memory of FusedSpectralLinear side by side with nn.Linear and the reference formulation.

    python benchmarks/throughput.py                 # headline run: the README's cases and targets (~4 min, 2 cores)
    python benchmarks/throughput.py --full          # the 96-case layer sweep + model level (~32 min on 2 cores)
    python benchmarks/throughput.py --quick         # smoke run (seconds; checks the script, not numbers)
    python benchmarks/throughput.py --device cuda   # GPU: fp32/bf16 layers, ViT-B model step
    python benchmarks/throughput.py --level layer --nets vit_b --layers proj --batches 1 --modes fwdbwd

The driver of the README's main command: layer_bench.py (one linear layer, every provider) and
model_bench.py (one IMSE SAM step of a random-init timm ViT) measure, report.py prints the tables, the
targets of targets.json (PASS/FAIL, never asserted) and the gaps, and writes
benchmarks/results/throughput_<machine>[_headline|_quick].{json,csv,txt} (+ .png with --plot).
The timing (paired ratios, medians over interleaved rounds, load recorded) is bench_common.py's.
"""
import argparse
import sys
from pathlib import Path

import bench_common as BC
import layer_bench as LB
import model_bench as MB
import report

# The headline run: the cases the README quotes, each measured once (not a cartesian product).
HEADLINE_LAYER = [("vit_s", "qkv", 64, "fwdbwd"), ("vit_s", "fc2", 64, "fwdbwd"), ("vit_b", "proj", 1, "fwdbwd"),
                  ("vit_s", "qkv", 64, "infer"), ("vit_s", "fc2", 64, "infer"), ("vit_s", "proj", 1, "infer"),
                  ("vit_b", "proj", 1, "infer"), ("vit_s", "fc2", 64, "frozen"), ("vit_b", "proj", 1, "frozen")]
HEADLINE_LAYER_PROVIDERS = "linear,linear_frozen,reference,fused_auto"
HEADLINE_MODELS, HEADLINE_MODEL_BATCHES, HEADLINE_MODEL_PROVIDERS = "vit_small", "1,8", "imse,imse_reference"
SELECTION_FLAGS = ("nets", "layers", "batches", "modes", "providers", "dtypes", "models", "model_batches",
                   "model_providers", "precisions")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", default="layer,model", help="layer, model or both (comma list)")
    ap.add_argument("--full", action="store_true",
                    help="the full sweep: every net x layer x batch x mode, and the model "
                    "level (the default without flags is the short headline run of the README's cases)")
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="re-render the tables of a saved run (no measuring); rewrites its .txt unless --no-save")
    BC.add_common_args(ap)
    LB.add_args(ap)
    MB.add_args(ap)
    args = ap.parse_args(argv)
    if args.report:
        return args
    if args.full and args.quick:
        ap.error("--full and --quick exclude each other")
    explicit = [f for f in SELECTION_FLAGS if getattr(args, f) is not None] + ["level"] * (args.level != "layer,model")
    args.headline = not (args.full or args.quick or args.device == "cuda" or explicit or args.merge or args.triton)
    args.cases = None
    if args.headline:
        args.cases = HEADLINE_LAYER
        args.providers = HEADLINE_LAYER_PROVIDERS
        args.models, args.model_batches = HEADLINE_MODELS, HEADLINE_MODEL_BATCHES
        args.model_providers = HEADLINE_MODEL_PROVIDERS
        args.rounds = args.rounds or 7
        args.max_case_s = args.max_case_s or 5.0  # the model level allows 4x this per case
        args.warmup = min(args.warmup, 1)
    BC.resolve_common(args, ap)
    LB.resolve(args, ap)
    MB.resolve(args, ap)
    args.level = BC.csv_list(args.level)
    bad = [lv for lv in args.level if lv not in ("layer", "model")]
    if bad:
        ap.error(f"--level: unknown {bad}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report.rerender(Path(args.report), save=not args.no_save, gflops=args.gflops)
    measures = [lambda records, log, m=m: m.run(args, records, log)
                for lv, m in (("layer", LB), ("model", MB)) if lv in args.level]
    note = ("headline run: the README's cases and targets (--full: the 96-case sweep; --help: every flag)"
            if args.headline else None)
    return report.run(args, measures, "throughput", note)


if __name__ == "__main__":
    sys.exit(main())
