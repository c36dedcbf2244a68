#!/usr/bin/env python
"""What `IMSE(..., compile=True)` costs up front: the first call's time and the graphs compiled over a stream.

    python benchmarks/compile_warmup.py                               # ViT-S, inductor, batches 8,8,8,3,8,3,1
    python benchmarks/compile_warmup.py --model vit_tiny --batches 8,8,3 --backend aot_eager

Each call is one adaptation step on a fresh random batch; the table gives its wall time and how many graphs
the backend has been handed so far (a recompile adds one). The eager step on the same batch size is timed
after, for comparison. Inductor's on-disk caches point at a fresh temporary folder, so the first call pays
the whole compile (`--warm-cache` keeps the user's caches). Writes benchmarks/results/compile_warmup_<tag>.{txt,json}.
"""
import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import bench_common as BC
import model_bench as MB
import torch
from torch._dynamo.testing import CompileCounterWithBackend


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--batches", default="8,8,8,3,8,3,1", help="batch sizes of the stream, in order")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--eager-reps", type=int, default=3, help="eager steps timed per distinct batch size")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's on-disk caches (default: a fresh folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=None, help="override the ViT depth (smoke runs; IMSE needs > 3)")
    ap.add_argument("--img-size", type=int, default=None, help="override the image size (smoke runs)")
    ap.add_argument("--out-dir", default=None, help=f"default {BC.RESULTS_DIR}")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the machine tag)")
    args = ap.parse_args(argv)
    if not args.warm_cache:  # read when inductor first opens its cache, which no compile has done yet
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="imse_compile_warmup_")
    torch.set_num_threads(args.threads)
    from imse_kernels.tta import IMSE, IMSEConfig

    env = BC.env_info("cpu")
    print(BC.install_banner(env["install"]), flush=True)
    batches = [int(b) for b in BC.csv_list(args.batches)]
    base = MB.make_model(args.model, "cpu", depth=args.depth, img_size=args.img_size)
    size = MB.image_size(base)
    counter = CompileCounterWithBackend(args.backend)  # frame_count: graphs handed to the backend
    torch._dynamo.reset()
    compiled = IMSE(copy.deepcopy(base), IMSEConfig(), compile={"backend": counter})
    eager = IMSE(copy.deepcopy(base), IMSEConfig())
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, b in enumerate(batches):
        x = torch.randn(b, 3, *size, generator=g)
        t = time.perf_counter()
        compiled(x)
        rows.append({"call": i + 1, "batch": b, "seconds": time.perf_counter() - t, "graphs": counter.frame_count})
        print(f"call {i + 1:2d}  batch {b:3d}  {rows[-1]['seconds']:8.2f} s  graphs so far {counter.frame_count}",
              flush=True)
    eager_s = {}
    for b in sorted(set(batches)):
        x = torch.randn(b, 3, *size, generator=g)
        eager(x)
        ts = []
        for _ in range(args.eager_reps):
            t = time.perf_counter()
            eager(x)
            ts.append(time.perf_counter() - t)
        eager_s[b] = statistics.median(ts)
    lines = [f"compile warm-up: {args.model}, backend {args.backend}, threads {args.threads}, "
             f"OMP_WAIT_POLICY {env['omp_wait_policy']}, {'warm' if args.warm_cache else 'cold'} inductor cache, "
             f"torch {env['torch']}, commit {str(env['git_commit'])[:10]}",
             f"cpu {env['cpu']} ({env['cpu_count']} cores)", "",
             "call  batch  seconds  graphs so far  eager step s (median)"]
    lines += [f"{r['call']:4d}  {r['batch']:5d}  {r['seconds']:7.2f}  {r['graphs']:13d}  {eager_s[r['batch']]:.3f}"
              for r in rows]
    lines += ["", f"first call (warm-up) {rows[0]['seconds']:.1f} s; graphs over the stream {counter.frame_count} "
              f"for {len(set(batches))} distinct batch sizes"]
    text = "\n".join(lines)
    print("\n" + text)
    out_dir = Path(args.out_dir) if args.out_dir else BC.RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"compile_warmup_{args.tag or BC.machine_tag('cpu')}"
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "args": vars(args), "calls": rows,
                                                     "eager_step_s": eager_s, "graphs": counter.frame_count}, indent=1))


if __name__ == "__main__":
    main()
