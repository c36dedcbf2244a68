#!/usr/bin/env python
"""Data-parallel IMSE (docs/design.md section 9): bytes communicated per step, and step time at 1 and 2 ranks.

    python benchmarks/dp_bench.py            # ViT-S/16, global batch 8; and the bytes of ViT-B/16 at batch 2
    python benchmarks/dp_bench.py --quick    # a 4-block ViT-Tiny at 32 px, seconds

Each configuration is a set of processes (gloo over localhost, one rank per process, `--threads` torch threads
per rank) adapting the same model on the same global batch, each rank its shard; a step starts after a barrier
and its time is rank 0's. The bytes are what `imse_kernels.tta.distributed.GroupComm` counts per collective
(the payload each rank sends in). Configurations run in alternating rounds so machine load hits them alike;
the table quotes medians and the median of per-round ratios. Writes benchmarks/results/dp_<machine>[_quick].{json,txt}.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as BC
import torch


def build(model_name: str, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    if model_name == "tiny":
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
        return m, (3, 32, 32)
    return timm.create_model(model_name, pretrained=False, num_classes=1000), (3, 224, 224)


def worker(args) -> None:
    """One rank: adapt `--steps` batches after `--warmup`, write rank 0's timings and byte counts."""
    import torch.distributed as dist

    from imse_kernels.tta import IMSE
    from imse_kernels.tta.distributed import init_distributed

    torch.set_num_threads(args.threads)
    rank, world = args.rank, args.world
    group = None
    if world > 1:
        init_distributed("gloo", 300.0, init_method=args.init, rank=rank, world_size=world)
        group = dist.group.WORLD
    model, shape = build(args.model)
    adapter = IMSE(model, process_group=group)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *shape, generator=g)
    base, extra = divmod(args.batch, world)
    start = rank * base + min(rank, extra)
    shard = x[start:start + base + (rank < extra)]
    times, per_step = [], None
    for i in range(args.warmup + args.steps):
        if group is not None:
            dist.barrier()
        if adapter._comm is not None:
            adapter._comm.counter.reset()
        t0 = time.perf_counter()
        adapter(shard)
        times.append(time.perf_counter() - t0)
        if adapter._comm is not None and per_step is None and i >= 1:  # a step after the first (full window)
            per_step = {"bytes": dict(adapter._comm.counter.bytes), "calls": dict(adapter._comm.counter.calls)}
    if group is not None:
        dist.barrier()
    if rank == 0:
        trained_s = sum(p.numel() for p in adapter.optimizer.param_groups[0]["params"])
        Path(args.out).write_text(json.dumps({"times": times[args.warmup:], "comm": per_step,
                                              "trained_s": trained_s, "shard": int(shard.shape[0])}))
    if group is not None:
        dist.destroy_process_group()


def launch(model: str, world: int, threads: int, batch: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--world", str(world), "--threads", str(threads),
               "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--out", str(out),
               "--init", f"file://{tmp}/rendezvous"]
        procs = [subprocess.Popen(cmd + ["--rank", str(q)], env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                 for q in range(world)]
        rcs = [p.wait() for p in procs]
        if any(rcs):
            raise RuntimeError(f"dp_bench: ranks exited with {rcs} ({' '.join(cmd)})")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration and round")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--init", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    model = "tiny" if args.quick else "vit_small_patch16_224"
    batch = args.batch or 8
    rounds, steps = args.rounds or (1 if args.quick else 3), args.steps or (2 if args.quick else 3)
    env = BC.env_info("cpu")
    print(BC.install_banner(env["install"]), flush=True)
    t_start = time.perf_counter()
    configs = {"1 rank x 2 threads": (1, 2), "1 rank x 1 thread": (1, 1), "2 ranks x 1 thread": (2, 1)}
    runs = {name: [] for name in configs}
    for r in range(rounds):
        for name, (world, threads) in configs.items():
            res = launch(model, world, threads, batch, steps, args.warmup)
            runs[name].append(res)
            print(f"  round {r + 1}: {name}: step {statistics.median(res['times']) * 1e3:.0f} ms "
                  f"(load {BC.load1():.1f})", flush=True)
    med = {n: statistics.median(t for res in v for t in res["times"]) for n, v in runs.items()}
    ratio = {n: statistics.median(statistics.median(a["times"]) / statistics.median(b["times"])
                                  for a, b in zip(runs["1 rank x 2 threads"], v)) for n, v in runs.items()}
    comm = runs["2 ranks x 1 thread"][0]["comm"]
    vit_b = None if args.quick else launch("vit_base_patch16_224", 2, 1, 2, 1, 1)
    lines = [f"dp_bench on {BC.machine_tag('cpu')}, fp32, IMSE step (SAM: two forward+backward passes), "
             f"{'a 4-block ViT-Tiny at 32 px' if args.quick else 'ViT-S/16 at 224 px'}, global batch {batch}; "
             f"{rounds} rounds x {steps} steps; total {time.perf_counter() - t_start:.0f} s, "
             f"load {BC.load1():.1f} at end",
             "", "configuration          step ms   (1 rank x 2 threads) / this, median of rounds"]
    lines += [f"{n:<22} {med[n] * 1e3:>8.0f}   {ratio[n]:.2f}" for n in configs]
    lines += ["", f"bytes each rank sends per step, 2 ranks ({runs['2 ranks x 1 thread'][0]['trained_s']} trained s; "
                  f"shard of {runs['2 ranks x 1 thread'][0]['shard']} images)"]
    lines += [f"  {k:<16} {comm['calls'][k]} call(s)  {v:>9,d} B" for k, v in comm["bytes"].items()]
    lines.append(f"  {'total':<16}            {sum(comm['bytes'].values()):>9,d} B")
    if vit_b is not None:
        c = vit_b["comm"]
        lines += ["", f"ViT-B/16, 2 ranks, global batch 2 ({vit_b['trained_s']} trained s): "
                  + ", ".join(f"{k} {v:,d} B" for k, v in c["bytes"].items())
                  + f"; total {sum(c['bytes'].values()):,d} B per step (domain moments grow with the shard: "
                    f"(2C + 1) x 8 B per image, C = 768)"]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_save:
        stem = f"dp_{BC.machine_tag('cpu')}" + ("_quick" if args.quick else "")
        BC.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (BC.RESULTS_DIR / f"{stem}.json").write_text(json.dumps({"env": env, "runs": runs, "vit_b": vit_b}, indent=1,
                                                                default=str))
        (BC.RESULTS_DIR / f"{stem}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
