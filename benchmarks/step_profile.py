#!/usr/bin/env python
"""Where one model-level step spends its time: GEMMs, attention, casts and everything else, per provider
and precision.

    python benchmarks/step_profile.py                      # ViT-S batch 1: imse, imse_reference, tent
    python benchmarks/step_profile.py --model vit_tiny --batch 8 --providers imse,tent
    python benchmarks/step_profile.py --batch 8 --providers imse,imse_reference --precisions fp32,bf16 --save

Wall time comes from bench_common's harness (every provider in every precision side by side, interleaved
rounds, medians; x/first: time over the first row's, the median of paired ratios). GEMM, attention, casts
and other are torch.profiler self-times of separately profiled calls, medians over --reps: "GEMM" is
aten::mm/addmm/bmm/baddbmm (oneDNN's bf16 kernels run inside them), "attention" the fused
scaled-dot-product kernels forward and backward, "casts" aten::copy_ (dtype conversions, and the
copies that make operands contiguous or broadcast a bias), "other" the rest. They carry the profiler's own
overhead, mostly in "other": use them to compare, not as wall time. bf16/fp16 run under
imse_kernels.precision.autocast("cpu", ...) (on a CPU without AMX attention stays fp32), bf16-torch under plain
torch.autocast (docs/design.md §14). CPU only. --save writes
benchmarks/results/step_profile_<machine>_<model>_b<batch>_<providers>[_<precisions>].txt with the load and
OpenMP's wait policy.
"""
import argparse
import os
import statistics

import bench_common as BC
import model_bench as MB
import torch
from torch.profiler import profile

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product"
CAST_OPS = {"aten::copy_"}


def profile_split(step) -> tuple:
    """(GEMM, attention, casts, other) ms of one profiled call: profiler self-times."""
    with profile() as prof:
        step()
    parts = [0.0, 0.0, 0.0, 0.0]
    for e in prof.key_averages():
        i = 0 if e.key in GEMM_OPS else 1 if e.key.startswith(ATTENTION_PREFIX) else 2 if e.key in CAST_OPS else 3
        parts[i] += e.self_cpu_time_total / 1e3
    return tuple(parts)


def wrapped(adapter, x, precision):
    def step():
        with BC.amp_context("cpu", precision):
            return adapter(x)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--providers", default="imse,imse_reference,tent")
    ap.add_argument("--precisions", default="fp32", help="e.g. fp32,bf16,bf16-torch (bench_common.AMP_DTYPES)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds and profiled calls per provider")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--depth", type=int, default=None, help="override the ViT depth (smoke runs; IMSE needs > 3)")
    ap.add_argument("--img-size", type=int, default=None, help="override the image size (smoke runs)")
    ap.add_argument("--save", action="store_true", help="also write the table under benchmarks/results/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(BC.install_banner(BC.describe_install()), flush=True)
    providers = BC.csv_list(args.providers)
    precisions = BC.usable_precisions(BC.csv_list(args.precisions), "cpu")
    model = MB.make_model(args.model, "cpu", depth=args.depth, img_size=args.img_size)
    built = {prec: MB.build_providers(model, providers, "cpu") for prec in precisions}
    x = torch.randn(args.batch, 3, *MB.image_size(built[precisions[0]][providers[0]][1]))
    rows = [(p, prec) for prec in precisions for p in providers]
    fns = {f"{p}@{prec}": wrapped(built[prec][p][0], x, prec) for p, prec in rows}
    timings = BC.measure_interleaved(fns, "cpu", rounds=args.reps, min_block_s=0.0, warmup=2, min_rounds=args.reps)
    split = {k: [profile_split(fn) for _ in range(args.reps)] for k, fn in fns.items()}
    first = next(iter(fns))
    env = BC.env_info("cpu")
    lines = [f"{args.model} batch {args.batch}, medians of {args.reps} (ms); GEMM, attention, casts, other: profiler "
             f"self-times (module doc); x/first: paired ratio of wall times to {first}",
             f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY {env['omp_wait_policy']}, load average "
             f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end, commit {str(env['git_commit'])[:10]}"
             f"{'+dirty' if env['git_dirty'] else ''}, torch {env['torch']}",
             f"{'provider':<16} {'prec':<5} {'GEMM':>8} {'attention':>9} {'casts':>7} {'other':>8} {'wall':>8} "
             f"{'x/first':>8}"]
    for k in fns:
        p, prec = k.split("@")
        gemm, attn, casts, other = (statistics.median(v) for v in zip(*split[k]))
        ratio = BC.paired_ratio(timings[k], timings[first])
        lines.append(f"{p:<16} {prec:<5} {gemm:8.1f} {attn:9.1f} {casts:7.1f} {other:8.1f} "
                     f"{timings[k].median() * 1e3:8.1f} {ratio:8.2f}")
    text = "\n".join(lines)
    print(text)
    if args.save:
        tag = f"{BC.machine_tag('cpu')}_{args.model}_b{args.batch}_{'-'.join(providers)}" + (
            "" if precisions == ["fp32"] else "_" + "-".join(precisions))
        path = BC.RESULTS_DIR / f"step_profile_{tag}.txt"
        path.write_text(text + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
