#!/usr/bin/env python
"""Where one model-level step spends its time: GEMMs against everything else, per provider.

    python benchmarks/step_profile.py                      # ViT-S batch 1: imse, imse_reference, tent
    python benchmarks/step_profile.py --model vit_tiny --batch 8 --providers imse,tent

Wall time comes from bench_common's harness (interleaved rounds, medians; x/first: time over the first
provider's, the median of paired ratios). GEMM and other are torch.profiler self-times of separately profiled
calls (aten::mm/addmm/bmm/baddbmm are "GEMM", the rest "other"), medians over --reps; they carry the
profiler's own overhead, mostly in "other": use them to compare, not as wall time. CPU only.
"""
import argparse
import statistics

import bench_common as BC
import model_bench as MB
import torch
from torch.profiler import profile

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def profile_split(step, x) -> tuple:
    """(GEMM ms, other ms) of one profiled call: profiler self-times."""
    with profile() as prof:
        step(x)
    events = prof.key_averages()
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e3
    return gemm, sum(e.self_cpu_time_total for e in events) / 1e3 - gemm


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--providers", default="imse,imse_reference,tent")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds and profiled calls per provider")
    ap.add_argument("--depth", type=int, default=None, help="override the ViT depth (smoke runs; IMSE needs > 3)")
    ap.add_argument("--img-size", type=int, default=None, help="override the image size (smoke runs)")
    args = ap.parse_args(argv)
    print(BC.install_banner(BC.describe_install()), flush=True)
    providers = BC.csv_list(args.providers)
    model = MB.make_model(args.model, "cpu", depth=args.depth, img_size=args.img_size)
    built = MB.build_providers(model, providers, "cpu")
    x = torch.randn(args.batch, 3, *MB.image_size(built[providers[0]][1]))
    fns = {p: (lambda step=built[p][0]: step(x)) for p in providers}
    timings = BC.measure_interleaved(fns, "cpu", rounds=args.reps, min_block_s=0.0, warmup=2,
                                     min_rounds=args.reps)
    split = {p: [profile_split(built[p][0], x) for _ in range(args.reps)] for p in providers}
    print(f"{args.model} batch {args.batch}, medians of {args.reps} (ms): GEMM and other are profiler self-times")
    print(f"{'provider':<16} {'GEMM':>8} {'other':>8} {'wall':>8} {'x/first':>8}")
    for p in providers:
        gemm, other = (statistics.median(v) for v in zip(*split[p]))
        ratio = BC.paired_ratio(timings[p], timings[providers[0]])
        print(f"{p:<16} {gemm:8.1f} {other:8.1f} {timings[p].median() * 1e3:8.1f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
