"""Where one model-level step spends its time: GEMMs against everything else, per provider.

    python benchmarks/step_profile.py                      # ViT-S batch 1: imse, imse_reference, tent
    python benchmarks/step_profile.py --model vit_tiny --batch 8 --providers imse,tent

Each repetition times one call (wall) and profiles another (torch.profiler self-times: aten::mm/addmm/
bmm/baddbmm are "GEMM", the rest "other"); providers are interleaved and medians printed. Profiler
self-times carry the profiler's own overhead, mostly in "other"; use them to compare, not as wall time.
"""
import argparse
import statistics
import time

import torch
from torch.profiler import profile

import model_bench as MB

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--providers", default="imse,imse_reference,tent")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=None, help="override the ViT depth (smoke runs; IMSE needs > 3)")
    ap.add_argument("--img-size", type=int, default=None, help="override the image size (smoke runs)")
    args = ap.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    model = MB.make_model(args.model, "cpu", depth=args.depth, img_size=args.img_size)
    built = MB.build_providers(model, providers, "cpu")
    x = torch.randn(args.batch, 3, *MB.image_size(built[providers[0]][1]))
    for p in providers:
        for _ in range(2):
            built[p][0](x)
    stats = {p: {"gemm": [], "other": [], "wall": []} for p in providers}
    for _ in range(args.reps):
        for p in providers:
            step = built[p][0]
            t0 = time.perf_counter()
            step(x)
            stats[p]["wall"].append((time.perf_counter() - t0) * 1e3)
            with profile() as prof:
                step(x)
            events = prof.key_averages()
            gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e3
            stats[p]["gemm"].append(gemm)
            stats[p]["other"].append(sum(e.self_cpu_time_total for e in events) / 1e3 - gemm)
    print(f"{args.model} batch {args.batch}, medians of {args.reps} (ms): GEMM and other are profiler self-times")
    print(f"{'provider':<16} {'GEMM':>8} {'other':>8} {'wall':>8}")
    for p in providers:
        m = {k: statistics.median(v) for k, v in stats[p].items()}
        print(f"{p:<16} {m['gemm']:8.1f} {m['other']:8.1f} {m['wall']:8.1f}")


if __name__ == "__main__":
    main()
