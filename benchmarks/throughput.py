#!/usr/bin/env python
"""Speed and memory of FusedSpectralLinear side by side with nn.Linear and the reference formulation.

    python benchmarks/throughput.py                 # headline run: the README's cases and targets (~4 min, 2 cores)
    python benchmarks/throughput.py --full          # the 96-case layer sweep + model level (~32 min on 2 cores)
    python benchmarks/throughput.py --quick         # smoke run (seconds; checks the script, not numbers)
    python benchmarks/throughput.py --device cuda   # GPU: fp32/bf16 layers, ViT-B model step
    python benchmarks/throughput.py --level layer --nets vit_b --layers proj --batches 1 --modes fwdbwd

Layer level (layer_bench.py): ViT-S/16 and ViT-B/16 qkv/proj/fc1/fc2 at batch 1/8/64 (N = batch·197),
modes fwd / fwdbwd / frozen / infer, providers nn.Linear (weight grad / frozen), the reference
F.linear(x, U @ diag(s) @ Vh, b), the naive factorized expression (eager and torch.compile) and
FusedSpectralLinear through every available backend and auto.
Model level (model_bench.py): one IMSE SAM step (two forward+backward) of a random-init timm ViT
with FusedSpectralLinear vs the reference-style step, plus Tent and plain inference; images/s and memory.

Timing: warm-up, then interleaved rounds (rotated order), medians with quartiles; ratios are medians of
per-round ratios (side by side). "min" columns use the fastest round of each provider instead, the
least contended estimate on a shared machine. Memory: "saved MB" is the peak of tensors held for
backward (autograd saved tensors, parameters and buffers excluded; exact on any device); "peak MB" is
torch.cuda.max_memory_allocated above the start on GPU, and on CPU the resident-set high-water mark
above the start (indicative only: the allocator may reuse memory it already holds).
Targets (PASS/FAIL lines, never asserted) come from benchmarks/targets.json.
Results: benchmarks/results/throughput_<machine>[_headline|_quick].{json,csv,txt} (+ .png with --plot).
The package measured is the installed imse_kernels; the first lines of every run say which, and
whether its compiled extension is loaded.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (RESULTS_DIR, env_info, fmt, install_banner, machine_tag, render_table,  # noqa: E402
                          write_outputs)

import torch  # noqa: E402

import layer_bench as LB  # noqa: E402

SHORT = {"linear": "lin", "linear_frozen": "linF", "reference": "ref", "naive": "naive",
         "naive_compile": "naiveC", "fused_auto": "f.auto"}


def short(p: str) -> str:
    return SHORT.get(p, p.replace("fused_", "f."))


def csv_list(s: str) -> list:
    return [v.strip() for v in s.split(",") if v.strip()]


TARGETS = Path(__file__).resolve().parent / "targets.json"

# The headline run: the cases the README quotes, each measured once (not a cartesian product).
HEADLINE_LAYER = [("vit_s", "qkv", 64, "fwdbwd"), ("vit_s", "fc2", 64, "fwdbwd"), ("vit_b", "proj", 1, "fwdbwd"),
                  ("vit_s", "qkv", 64, "infer"), ("vit_s", "fc2", 64, "infer"), ("vit_s", "proj", 1, "infer"),
                  ("vit_b", "proj", 1, "infer"), ("vit_s", "fc2", 64, "frozen"), ("vit_b", "proj", 1, "frozen")]
HEADLINE_LAYER_PROVIDERS = "linear,linear_frozen,reference,fused_auto"
HEADLINE_MODELS, HEADLINE_MODEL_BATCHES, HEADLINE_MODEL_PROVIDERS = "vit_small", "1,8", "imse,imse_reference"
SELECTION_FLAGS = ("nets", "batches", "providers", "dtypes", "models", "model_batches", "model_providers", "precisions")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--level", default="layer,model", help="layer, model or both (comma list)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: one shape, batch 1, few rounds, tiny model")
    ap.add_argument("--full", action="store_true", help="the full sweep: every net x layer x batch x mode, and the model "
                    "level (the default without flags is the short headline run of the README's cases)")
    # layer level
    ap.add_argument("--nets", default=None, help="vit_s,vit_b (default: both on CPU, vit_b on cuda)")
    ap.add_argument("--layers", default="qkv,proj,fc1,fc2")
    ap.add_argument("--batches", default=None, help="default 1,8,64 (cpu) / 1,64 (cuda)")
    ap.add_argument("--modes", default="fwd,fwdbwd,frozen,infer")
    ap.add_argument("--providers", default=None, help="layer providers (default: all; see layer_bench.py)")
    ap.add_argument("--skip-providers", default="", help="layer providers to leave out, e.g. naive_compile")
    ap.add_argument("--dtypes", default=None, help="fp32 (cpu default), fp32,bf16 (cuda default); fp16 too")
    # model level
    ap.add_argument("--models", default=None, help="vit_tiny,vit_small (cpu default) / vit_base (cuda default)")
    ap.add_argument("--model-batches", default=None, help="default 1,8 (cpu) / 8,64 (cuda)")
    ap.add_argument("--model-providers", default=None, help="default: " + ",".join(["imse", "imse_harness", "imse_reference", "tent", "source", "source_spectral"]))
    ap.add_argument("--precisions", default=None, help="model level: fp32 (cpu) / fp32,bf16 (cuda: autocast, s in fp32)")
    ap.add_argument("--model-depth", type=int, default=None, help="override the ViT depth (smoke runs)")
    ap.add_argument("--model-img-size", type=int, default=None, help="override the image size (smoke runs; default 224)")
    ap.add_argument("--imse-retrieval", default="none", help="IMSEConfig.retrieval for the imse provider")
    # method
    ap.add_argument("--rounds", type=int, default=None, help="max interleaved rounds per case (default 9 cpu / 15 cuda)")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--max-case-s", type=float, default=None, help="stop adding rounds (past --min-rounds) after this long")
    ap.add_argument("--min-block-s", type=float, default=None, help="target length of one timed block")
    ap.add_argument("--warmup", type=int, default=2, help="calls per provider before timing (the last one calibrates)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    # output
    ap.add_argument("--out-dir", default=None, help=f"default {RESULTS_DIR}")
    ap.add_argument("--tag", default=None, help="file name tag (default: the machine)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--plot", action="store_true", help="write a PNG (needs matplotlib)")
    ap.add_argument("--merge", action="store_true", help="merge into the existing results file: rows of the cases "
                    "measured now replace the same cases there (a rerun of noisy cases); the rest is kept")
    ap.add_argument("--report", default=None, metavar="JSON", help="re-render the tables of a saved run (no measuring); "
                    "rewrites its .txt unless --no-save")
    args = ap.parse_args(argv)
    if args.report:
        return args

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.full and args.quick:
        ap.error("--full and --quick exclude each other")
    explicit = [f for f in SELECTION_FLAGS if getattr(args, f) is not None] + [
        f for f, default in (("layers", "qkv,proj,fc1,fc2"), ("modes", "fwd,fwdbwd,frozen,infer"), ("level", "layer,model"))
        if getattr(args, f) != default]
    args.headline = not (args.full or args.quick or cuda or explicit or args.merge)
    args.cases = None
    if args.headline:
        args.cases = HEADLINE_LAYER
        args.providers = HEADLINE_LAYER_PROVIDERS
        args.models, args.model_batches = HEADLINE_MODELS, HEADLINE_MODEL_BATCHES
        args.model_providers = HEADLINE_MODEL_PROVIDERS
        args.rounds = args.rounds or 7
        args.max_case_s = args.max_case_s or 5.0  # the model level allows 4x this per case
        args.warmup = min(args.warmup, 1)
    q = args.quick
    d = lambda v, cpu, gpu, quick=None: v if v is not None else (quick if q and quick is not None else (gpu if cuda else cpu))  # noqa: E731
    args.nets = csv_list(d(args.nets, "vit_s,vit_b", "vit_b", "vit_s"))
    args.layers = csv_list("proj" if q and args.layers == "qkv,proj,fc1,fc2" else args.layers)
    args.batches = [int(b) for b in csv_list(d(args.batches, "1,8,64", "1,64", "1"))]
    args.modes = csv_list("fwdbwd,infer" if q and args.modes == "fwd,fwdbwd,frozen,infer" else args.modes)
    args.dtypes = csv_list(d(args.dtypes, "fp32", "fp32,bf16", "fp32"))
    args.models = csv_list(d(args.models, "vit_tiny,vit_small", "vit_base", "vit_tiny"))
    args.model_batches = [int(b) for b in csv_list(d(args.model_batches, "1,8", "8,64", "2"))]
    args.precisions = csv_list(d(args.precisions, "fp32", "fp32,bf16", "fp32"))
    args.rounds = d(args.rounds, 9, 15, 2)
    args.min_rounds = min(args.min_rounds, args.rounds) if not q else min(2, args.rounds)
    args.max_case_s = d(args.max_case_s, 8.0, 3.0, 0.5)
    args.min_block_s = d(args.min_block_s, 0.05, 0.02, 0.005)
    if q:
        args.warmup = min(args.warmup, 1)
        # one thread: an OpenMP team on oversubscribed shared cores stalls at every barrier
        args.threads = args.threads or (1 if not cuda else None)
        args.model_depth = args.model_depth or 4  # IMSE needs > 3 blocks (3 diversity blocks)
        args.model_img_size = args.model_img_size or 64
    args.level = csv_list(args.level)
    bad = [lv for lv in args.level if lv not in ("layer", "model")]
    if bad:
        ap.error(f"--level: unknown {bad}")
    for n in args.nets:
        if n not in LB.SHAPES:
            ap.error(f"--nets: unknown {n!r}; choose from {list(LB.SHAPES)}")
    for m in args.modes:
        if m not in LB.MODES:
            ap.error(f"--modes: unknown {m!r}; choose from {LB.MODES}")
    for t in args.dtypes + args.precisions:
        if t not in LB.DTYPES:
            ap.error(f"unknown dtype {t!r}; choose from {list(LB.DTYPES)}")
    return args


# --------------------------------------------------------------------------------------------
# Tables

def layer_table(records: list, providers: list) -> str:
    out = []
    for dtype in dict.fromkeys(r.dtype for r in records):
        rows = []
        keys = dict.fromkeys((r.case, r.batch, r.mode) for r in records if r.dtype == dtype)
        for case, batch, mode in keys:
            recs = {r.provider: r for r in records if (r.case, r.batch, r.mode, r.dtype) == (case, batch, mode, dtype)}
            any_r = next(iter(recs.values()))
            auto = recs.get("fused_auto")
            spread = max((((r.q3_ms - r.q1_ms) / r.median_ms) for r in recs.values() if r.median_ms == r.median_ms and r.median_ms > 0), default=math.nan)
            mem = "/".join(fmt(recs[p].saved_mb, 2) if p in recs else "-" for p in (LB.BASELINE[mode], "reference", "fused_auto"))
            rows.append([case, any_r.extra, batch, mode]
                        + [fmt(recs[p].median_ms) if p in recs and not recs[p].error else ("err" if p in recs else "") for p in providers]
                        + [fmt(auto.ratio_vs_baseline, 2) if auto else "-", fmt(auto.ratio_vs_baseline_min, 2) if auto else "-",
                           fmt(auto.speedup_vs_reference, 2) if auto else "-", fmt(auto.speedup_vs_reference_min, 2) if auto else "-",
                           mem, f"{spread * 100:.0f}%" if spread == spread else "-", fmt(any_r.load1, 1)])
        headers = (["layer", "d_in->d_out", "batch", "mode"] + [short(p) for p in providers]
                   + ["auto/base", "(min)", "ref/auto", "(min)", "savedMB base/ref/auto", "IQR", "load"])
        out.append(f"Layer level, {dtype}: median ms per call (N = batch*197 tokens); base = lin (linF in mode frozen)")
        out.append(render_table(headers, rows, left=2))
        errs = [r for r in records if r.dtype == dtype and r.error]
        for r in errs:
            out.append(f"  error: {r.case} b{r.batch} {r.mode} {r.provider}: {r.error}")
        out.append("")
    out.append("auto/base: time of FusedSpectralLinear (auto backend) / nn.Linear (<1 faster); ref/auto: speedup over the "
               "reference F.linear(x, U@diag(s)@Vh, b); (min): from each provider's fastest round. IQR: the widest "
               "interquartile range / median of the row. load: 1-min load average (2 shared cores: contention).")
    return "\n".join(out)


def _flop_ratio(records: list, r) -> float:
    ref = next((x for x in records if x.case == r.case and x.batch == r.batch and x.dtype == r.dtype
                and x.provider == "imse_reference"), None)
    return ref.gflop / r.gflop if ref is not None and r.gflop > 0 else math.nan


def model_table(records: list) -> str:
    rows = []
    for r in records:
        rows.append([r.case, r.batch, r.dtype, r.provider, r.mode,
                     "err" if r.error else fmt(r.median_ms), f"{fmt(r.q1_ms)}-{fmt(r.q3_ms)}", fmt(r.items_per_s, 2),
                     fmt(r.speedup_vs_reference, 2), fmt(r.speedup_vs_reference_min, 2), fmt(r.gflop, 1),
                     fmt(_flop_ratio(records, r), 2), fmt(r.saved_mb, 1), fmt(r.peak_mb, 1), r.rounds, fmt(r.load1, 1)])
    headers = ["model", "batch", "prec", "provider", "mode", "median ms", "q1-q3", "img/s", "ref/x", "(min)",
               "GFLOP", "flop ref/x", "savedMB", "peakMB", "rounds", "load"]
    method = next((r.peak_method for r in records if r.peak_method), "")
    note = ("ref/x: speedup over the reference-style step (imse_reference), medians of per-round ratios; (min): fastest rounds. "
            "GFLOP: GEMM + convolution FLOPs of one call (attention excluded); flop ref/x: the reference's count over this one, "
            "the speedup if only GEMM work counted. "
            f"savedMB: peak of tensors held for backward over one call; peakMB: {method}")
    return "Model level: one call = one adaptation step (SAM: two forward+backward) or one inference\n" + \
        render_table(headers, rows, left=5) + "\n" + note + "\n" + "\n".join(
            f"  error: {r.case} b{r.batch} {r.provider}: {r.error}" for r in records if r.error)


# --------------------------------------------------------------------------------------------
# Targets (benchmarks/targets.json): printed, never asserted

def _find(records, **kw):
    return [r for r in records if all(getattr(r, k) == v for k, v in kw.items()) and not r.error]


def load_targets(device: str, path: Path = TARGETS) -> list:
    return json.loads(path.read_text())[device]


_MATCH_FIELDS = ("case", "batch", "mode", "dtype", "provider")


def bars_report(layer: list, model: list, device: str, targets: Optional[list] = None) -> str:
    lines = [f"Targets ({TARGETS.name}); value = median of paired ratios, [min-round ratio]; the worst matching case counts:"]
    for t in (load_targets(device) if targets is None else targets):
        recs = _find(layer if t["level"] == "layer" else model, **{k: t[k] for k in _MATCH_FIELDS if k in t})
        desc, attr, op, thr = t["name"], t["metric"], t["op"], t["value"]
        if not recs:
            lines.append(f"  n/a   {desc} (not measured in this run)")
            continue
        vals = [(getattr(r, attr), getattr(r, attr + "_min"), r) for r in recs]
        worst = max(vals, key=lambda v: v[0]) if op == "<=" else min(vals, key=lambda v: v[0])
        ok = worst[0] <= thr if op == "<=" else worst[0] >= thr
        where = f" (worst: {worst[2].case} b{worst[2].batch} {worst[2].mode} {worst[2].dtype})" if len(recs) > 1 else ""
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {desc}: {worst[0]:.2f} [{worst[1]:.2f}] {op} {thr}{where}")
    if device == "cuda":
        lines += _cuda_derived_checks(layer, model)
    return "\n".join(lines)


def _cuda_derived_checks(layer: list, model: list) -> list:
    """Checks across providers: auto within 5% of the best fused backend; IMSE's peak memory under the reference's."""
    lines, worst = [], None
    for key in dict.fromkeys((r.case, r.batch, r.mode, r.dtype) for r in layer):
        recs = {r.provider: r for r in layer if (r.case, r.batch, r.mode, r.dtype) == key and not r.error}
        fused = [r.median_ms for p, r in recs.items() if p.startswith("fused_") and p != "fused_auto"]
        if "fused_auto" in recs and fused:
            v = recs["fused_auto"].median_ms / min(fused)
            worst = max(worst or (0, None), (v, key))
    if worst:
        lines.append(f"  {'PASS' if worst[0] <= 1.05 else 'FAIL'}  auto vs best backend (median ms ratio): {worst[0]:.2f} <= 1.05 (worst: {worst[1]})")
    for r in _find(model, provider="imse"):
        ref = _find(model, provider="imse_reference", case=r.case, batch=r.batch, dtype=r.dtype)
        if ref and r.peak_mb == r.peak_mb:
            ok = r.peak_mb <= ref[0].peak_mb
            lines.append(f"  {'PASS' if ok else 'FAIL'}  peak memory imse <= reference, {r.case} b{r.batch} {r.dtype}: {r.peak_mb:.0f} vs {ref[0].peak_mb:.0f} MB")
    return lines


def gap_report(layer: list, limit: int = 16, threshold: float = 1.10) -> str:
    """Where fused_auto is slower than the FLOP model says it should be (planner.step_flops, best route,
    over nn.Linear's FLOPs): gap = measured time ratio / FLOP ratio. Targets for kernels and planner."""
    rows = []
    for r in layer:
        if r.provider != "fused_auto" or r.error or r.dtype not in LB.DTYPES:
            continue
        net, lay = r.case.split(".")
        try:
            route, model = LB.flop_model(LB.Case(net, lay, r.batch, r.mode, r.dtype))
        except Exception:  # planner API changed
            return "Gaps: FLOP model unavailable"
        gap, gap_min = r.ratio_vs_baseline / model, r.ratio_vs_baseline_min / model
        if min(gap, gap_min) > threshold:
            rows.append((min(gap, gap_min), [r.case, r.batch, r.mode, r.dtype, route, f"{model:.2f}",
                                             fmt(r.ratio_vs_baseline, 2), fmt(r.ratio_vs_baseline_min, 2),
                                             f"{gap:.2f}", f"{gap_min:.2f}"]))
    if not rows:
        return f"Gaps: fused_auto within {threshold:.2f}x of the FLOP model everywhere"
    rows.sort(key=lambda t: -t[0])
    head = ["layer", "batch", "mode", "dtype", "route", "flops/base", "auto/base", "(min)", "gap", "(min)"]
    return (f"Gaps: fused_auto slower than the FLOP model by > {threshold:.2f}x (both median and min), worst first "
            f"({len(rows)} cases; flops/base = planner FLOPs of the cheaper route / nn.Linear FLOPs)\n"
            + render_table(head, [r for _, r in rows[:limit]], left=4))


def plot(records: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no PNG written (pip install matplotlib)")
        return
    layer = [r for r in records if r.level == "layer" and r.provider == "fused_auto" and not r.error]
    if not layer:
        print("--plot: no layer-level fused_auto results to plot")
        return
    modes = list(dict.fromkeys(r.mode for r in layer))
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        rs = [r for r in layer if r.mode == mode]
        labels = [f"{r.case}\nb{r.batch} {r.dtype}" for r in rs]
        ax.bar(range(len(rs)), [r.ratio_vs_baseline for r in rs], label="auto / nn.Linear")
        ax.bar(range(len(rs)), [1 / r.speedup_vs_reference if r.speedup_vs_reference else math.nan for r in rs],
               alpha=0.4, label="auto / reference")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rs)), labels, fontsize=6)
        ax.set_title(f"mode {mode}: time ratio (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------

def render(header: str, layer_records: list, model_records: list, device: str, footer: str) -> str:
    text = [header, ""]
    if layer_records:
        text += [layer_table(layer_records, [p for p in dict.fromkeys(r.provider for r in layer_records)]), ""]
    if model_records:
        text += [model_table(model_records), ""]
    text += [bars_report(layer_records, model_records, device), ""]
    if layer_records:
        text += [gap_report(layer_records), ""]
    return "\n".join(text + [footer])


def header_line(env: dict, device: str, tag: str) -> str:
    return (f"imse_kernels throughput  device={device}  machine={tag}  torch {env['torch']}  "
            f"triton {env['triton']}  commit {str(env['git_commit'])[:10]}{'+dirty' if env['git_dirty'] else ''}  "
            f"threads {env['torch_threads']}  backends {','.join(k for k, v in env['backends'].items() if v is None)}")


def report(args) -> int:
    """Re-render the tables of a saved JSON (after a change to the report, without measuring again)."""
    path = Path(args.report)
    data, records = _load_records(path)
    env, device = data["env"], data["env"].get("device", "cpu")
    tag = path.stem.replace("throughput_", "")
    text = render(header_line(env, device, tag), [r for r in records if r.level == "layer"],
                  [r for r in records if r.level == "model"], device, f"(re-rendered from {path.name})")
    print(text)
    if not args.no_save:
        path.with_suffix(".txt").write_text(text + "\n")
        print(f"wrote {path.with_suffix('.txt')}")
    return 0


def _load_records(path: Path):
    import json

    from bench_common import Record

    data = json.loads(path.read_text())
    fields = Record.__dataclass_fields__
    records = [Record(**{k: (math.nan if v is None and fields[k].type in (float, "float") else v)
                         for k, v in row.items() if k in fields}) for row in data["results"]]
    return data, records


def merge_records(path: Path, new: list, env: dict, config: dict, device: str):
    """Replace the rows of `path` whose case (level, case, batch, mode, dtype) was measured again."""
    data, old = _load_records(path)
    key = lambda r: (r.level, r.case, r.batch, r.mode, r.dtype)  # noqa: E731
    fresh = {key(r) for r in new}
    merged, pending = [], {k: [r for r in new if key(r) == k] for k in dict.fromkeys(key(r) for r in new)}
    for r in old:
        k = key(r)
        if k in fresh:
            merged += pending.pop(k, [])
        else:
            merged.append(r)
    for rs in pending.values():
        merged += rs
    first_env = data["env"]
    first_env.setdefault("reruns", []).append({"timestamp": env["timestamp"], "git_commit": env["git_commit"],
                                               "git_dirty": env["git_dirty"], "cases": len(fresh),
                                               "argv": sys.argv[1:]})
    cfg = data.get("config", {})
    text = render(header_line(first_env, device, path.stem.replace("throughput_", "")),
                  [r for r in merged if r.level == "layer"], [r for r in merged if r.level == "model"], device,
                  f"merged: {len(fresh)} cases re-measured {env['timestamp']} (commit {str(env['git_commit'])[:10]}) "
                  f"replace those of the first run; see env.reruns in the JSON")
    return merged, first_env, cfg, text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    t_start = time.perf_counter()
    env = env_info(device)
    header = header_line(env, device, machine_tag(device)) + "\n" + install_banner(env["install"])
    print(header, flush=True)
    if args.headline:
        print("headline run: the README's cases and targets (--full: the 96-case sweep; --help: every flag)", flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    layer_records, model_records = [], []
    memory = not args.no_memory
    # a TERM (e.g. `timeout` in gpu_check.sh) stops measuring; what was measured is still written
    signal.signal(signal.SIGTERM, _on_term)
    interrupted = None
    try:
        _measure(args, device, layer_records, model_records, memory, log)
    except (_Interrupted, KeyboardInterrupt) as exc:
        interrupted = type(exc).__name__
        log(f"interrupted ({interrupted}): writing the {len(layer_records) + len(model_records)} results measured so far")
    records = layer_records + model_records

    footer = f"total {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.1f}"
    if interrupted:
        footer += f"; INTERRUPTED ({interrupted}): partial results"
    text = render(header, layer_records, model_records, device, footer)
    print("\n" + text, flush=True)

    if not args.no_save:
        out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
        stem = f"throughput_{args.tag or machine_tag(device)}" + ("_quick" if args.quick else "_headline" if args.headline else "")
        config = {k: v for k, v in vars(args).items()}
        config["interrupted"] = interrupted
        if args.merge and (out_dir / f"{stem}.json").exists():
            records, env, config, text = merge_records(out_dir / f"{stem}.json", records, env, config, device)
            print("\n" + text, flush=True)
        paths = write_outputs(out_dir, stem, env, config, records, text + "\n")
        if args.plot:
            plot(records, out_dir / f"{stem}.png")
        print("wrote " + ", ".join(str(p) for p in paths))
    elif args.plot:
        print("--plot with --no-save: nothing written")
    return 0 if not interrupted else 3


class _Interrupted(BaseException):  # not an Exception: provider error handlers must not swallow it
    pass


def _on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM kills
    raise _Interrupted()


def _measure(args, device, layer_records, model_records, memory, log) -> None:
    if "layer" in args.level:
        wanted = csv_list(args.providers) if args.providers else LB.all_providers(device)
        if args.quick and not args.providers:
            wanted = [p for p in wanted if p != "naive_compile"]  # its first compile alone takes ~20 s on 2 cores
        skip = set(csv_list(args.skip_providers))
        unknown = [p for p in wanted if p not in LB.known_providers()]
        if unknown:
            print(f"unknown or unavailable layer providers {unknown}; available: {LB.known_providers()}")
            raise SystemExit(2)
        providers = [p for p in wanted if p not in skip]
        if args.cases:
            cases = [LB.Case(n, lay, b, m, dt) for dt in args.dtypes for n, lay, b, m in args.cases]
        else:
            cases = [LB.Case(n, lay, b, m, dt) for dt in args.dtypes for n in args.nets for b in args.batches
                     for lay in args.layers for m in args.modes]
        for i, case in enumerate(cases):
            t0 = time.perf_counter()
            recs = LB.run_case(case, device, providers, args.rounds, args.min_block_s, args.warmup,
                               min_rounds=args.min_rounds, max_case_s=args.max_case_s, memory=memory, log=log)
            layer_records += recs
            auto = next((r for r in recs if r.provider == "fused_auto"), None)
            log(f"[{i + 1}/{len(cases)}] {case.name} b{case.batch} {case.mode} {case.dtype}: "
                + " ".join(f"{short(r.provider)}={fmt(r.median_ms)}" for r in recs)
                + (f"  auto/base={fmt(auto.ratio_vs_baseline, 2)} ref/auto={fmt(auto.speedup_vs_reference, 2)}" if auto else "")
                + f"  ({time.perf_counter() - t0:.1f}s)")

    if "model" in args.level:
        import model_bench as MB

        wanted = csv_list(args.model_providers) if args.model_providers else list(MB.PROVIDERS)
        if args.quick and not args.model_providers:
            wanted = ["imse", "imse_harness", "imse_reference", "source"]
        if not MB.tta_available():
            log("imse_kernels.tta is not importable: the imse provider is skipped, Tent uses the hand-written fallback")
            wanted = [p for p in wanted if p != "imse"]
        for name in args.models:
            base = MB.make_model(name, device, depth=args.model_depth, img_size=args.model_img_size)
            built = MB.build_providers(base, wanted, device, imse_retrieval=args.imse_retrieval)
            label = name + (f"-depth{args.model_depth}" if args.model_depth else "") + (
                f"-img{args.model_img_size}" if args.model_img_size else "")
            for prec in args.precisions:
                if prec != "fp32" and device != "cuda":
                    log(f"model level: {prec} autocast is measured on cuda only; skipped")
                    continue
                for b in args.model_batches:
                    t0 = time.perf_counter()
                    recs = MB.run_model_case(label, b, device, prec, wanted, built, args.rounds, args.warmup,
                                             args.min_rounds, args.max_case_s * 4, min_block_s=args.min_block_s,
                                             memory=memory, log=log)
                    model_records += recs
                    log(f"[model] {label} b{b} {prec}: " + " ".join(
                        f"{r.provider}={fmt(r.median_ms)}ms" for r in recs) + f"  ({time.perf_counter() - t0:.1f}s)")
            del built, base


if __name__ == "__main__":
    sys.exit(main())
