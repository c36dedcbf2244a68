"""Speed targets of the `triton` backend at ViT-B/16 layer shapes on one CUDA GPU.

For each layer (qkv, proj, fc1, fc2), dtype and batch (197 tokens per image), times, side by side:

  linear      nn.Linear, weight gradient on (the full fine-tuning reference point)
  reference   F.linear(x, U @ torch.diag(s) @ Vh, b) with s trainable (the official formulation)
  spectral    spectral_linear on the triton backend, route chosen by the planner
  spectral_F / spectral_R   the same with the route pinned (planner.force_route)
  linear_inf / spectral_inf inference (no_grad) with frozen s: nn.Linear vs FusedSpectralLinear

"step" is forward + backward (x requires grad in every provider). Each provider is warmed up first
(this runs the tuner once per shape), then `--rounds` rounds time every provider in turn (CUDA
events, a block of calls each); medians are reported with the targets:

  batch 64: spectral ≤ 1.0 × linear (qkv, fc1, fc2), ≤ 1.05 × (proj); reference ≥ 1.1 × spectral
  batch 1:  reference ≥ 3 × spectral;  inference with frozen s: spectral_inf ≤ 1.02 × linear_inf

Writes <out>/triton_speed.json and <out>/triton_speed.md. Needs a GPU; a benchmark, not a test.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # results land under benchmarks/; the installed package is measured

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imse_kernels import FusedSpectralLinear, spectral_linear, use_backend  # noqa: E402
from imse_kernels.ops import planner  # noqa: E402
from imse_kernels.triton_kernels import tuning  # noqa: E402

LAYERS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
STEP_LIMIT = {"qkv": 1.0, "fc1": 1.0, "fc2": 1.0, "proj": 1.05}


def _time_block(fn, number: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / number  # ms per call


def bench(providers: dict, rounds: int, min_block_ms: float = 20.0) -> dict:
    """Median ms per call of each provider, measured in interleaved rounds."""
    numbers = {}
    for name, fn in providers.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        one = _time_block(fn, 3)
        numbers[name] = max(1, int(min_block_ms / max(one, 1e-3)))
    samples = {n: [] for n in providers}
    names = list(providers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_time_block(providers[name], numbers[name]))
    return {n: statistics.median(v) for n, v in samples.items()}


def case(layer: str, dtype: torch.dtype, tokens: int, rounds: int) -> dict:
    d_in, d_out = LAYERS[layer]
    dev = "cuda"
    lin = torch.nn.Linear(d_in, d_out, device=dev, dtype=dtype)
    fsl = FusedSpectralLinear.from_linear(lin)
    U, s0, Vh, b = fsl.U, fsl.s.detach(), fsl.Vh, fsl.bias
    s = s0.clone().requires_grad_()
    x = torch.randn(tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, d_out, device=dev, dtype=dtype)

    def step(y):
        y.backward(gy)
        x.grad = None
        s.grad = None
        lin.weight.grad = None
        lin.bias.grad = None

    def linear():
        step(lin(x))

    def reference():
        step(F.linear(x, U @ torch.diag(s.to(dtype)) @ Vh, b))

    def spectral():
        step(spectral_linear(x, U, s, Vh, b))

    def spectral_forced(route):
        def run():
            with planner.force_route(route):
                step(spectral_linear(x, U, s, Vh, b))
        return run

    fsl.s.requires_grad_(False)
    x_inf = x.detach()

    def linear_inf():
        with torch.no_grad():
            lin(x_inf)

    def spectral_inf():
        with torch.no_grad():
            fsl(x_inf)

    providers = {"linear": linear, "reference": reference, "spectral": spectral,
                 "spectral_F": spectral_forced("factorized"), "spectral_R": spectral_forced("recomposed"),
                 "linear_inf": linear_inf, "spectral_inf": spectral_inf}
    with use_backend("triton"):
        t0 = time.time()
        ms = bench(providers, rounds)
        wall = time.time() - t0
    route = planner.plan(tokens, d_in, d_out, U.shape[1], True, True, False).route
    return {"layer": layer, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "ms": ms,
            "planner_route": "F" if route == planner.FACTORIZED else "R", "wall_s": round(wall, 1)}


def verdicts(row: dict) -> dict:
    ms = row["ms"]
    out = {"spectral/linear": ms["spectral"] / ms["linear"], "reference/spectral": ms["reference"] / ms["spectral"],
           "best_route/linear": min(ms["spectral_F"], ms["spectral_R"]) / ms["linear"],
           "spectral_inf/linear_inf": ms["spectral_inf"] / ms["linear_inf"]}
    if row["tokens"] >= 64 * 197:
        out["pass_step"] = out["spectral/linear"] <= STEP_LIMIT[row["layer"]]
        out["pass_vs_reference"] = out["reference/spectral"] >= 1.1
    if row["tokens"] <= 197:
        out["pass_vs_reference"] = out["reference/spectral"] >= 3.0
    out["pass_inference"] = out["spectral_inf/linear_inf"] <= 1.02
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="qkv,proj,fc1,fc2")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--batches", default="64,1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_speed: needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for dname in args.dtypes.split(","):
        for batch in map(int, args.batches.split(",")):
            for layer in args.layers.split(","):
                row = case(layer, DTYPES[dname], batch * 197, args.rounds)
                row["batch"] = batch
                row["verdict"] = verdicts(row)
                rows.append(row)
                v = row["verdict"]
                print(f"{layer:5s} {dname} b{batch:<3d} " + " ".join(f"{k}={t:.3f}" for k, t in row["ms"].items())
                      + f" | spectral/linear={v['spectral/linear']:.3f} ref/spectral={v['reference/spectral']:.2f}"
                      f" inf={v['spectral_inf/linear_inf']:.3f} route={row['planner_route']}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "tf32": False,
            "tuner_choices": tuning.choices()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# triton backend speed — {meta['device']} (sm_{meta['capability'][0]}{meta['capability'][1]}), "
             f"torch {meta['torch']}, triton {meta['triton']}", "",
             "| layer | dtype | batch | linear ms | reference ms | spectral ms | F ms | R ms | spectral/linear | ref/spectral | inf ratio | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, v = r["ms"], r["verdict"]
        ok = all(val for key, val in v.items() if key.startswith("pass"))
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['batch']} | {ms['linear']:.3f} | {ms['reference']:.3f} | "
                     f"{ms['spectral']:.3f} | {ms['spectral_F']:.3f} | {ms['spectral_R']:.3f} | {v['spectral/linear']:.3f} | "
                     f"{v['reference/spectral']:.2f} | {v['spectral_inf/linear_inf']:.3f} | {'yes' if ok else 'NO'} |")
    (out / "triton_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
