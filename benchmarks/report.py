#!/usr/bin/env python
"""What a benchmark run prints and writes: tables, the targets' PASS/FAIL, gaps, plot, files, merging.

    python benchmarks/report.py benchmarks/results/throughput_cpu-AMD-EPYC-2c.json   # re-render a saved run
    python benchmarks/report.py RESULTS.json --no-save --gflops                     # print only, with GFLOP/s

Targets come from targets.json (printed, never asserted). Every script (layer_bench, model_bench,
throughput) measures through `run`, so the banner, tables and files are the same everywhere.
"""
import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import layer_cases as LC
from bench_common import RESULTS_DIR, Record, env_info, fmt, install_banner, machine_tag

from imse_kernels.text_table import render_table

TARGETS = Path(__file__).resolve().parent / "targets.json"
SHORT = {"linear": "lin", "linear_frozen": "linF", "reference": "ref", "naive": "naive",
         "naive_compile": "naiveC", "fused_auto": "f.auto"}


def short(p: str) -> str:
    return SHORT.get(p, p.replace("fused_", "f."))


# --------------------------------------------------------------------------------------------
# Tables

def _groups(records: list, *fields) -> dict:
    out = {}
    for r in records:
        out.setdefault(tuple(getattr(r, f) for f in fields), {})[r.provider] = r
    return out


def layer_table(records: list, providers: list) -> str:
    paired = any(not math.isnan(r.speedup_vs_fp32) for r in records)  # --precisions: fp32/x columns
    ratio_fields = ["ratio_vs_baseline", "ratio_vs_baseline_min", "speedup_vs_reference", "speedup_vs_reference_min"]
    ratio_fields += ["speedup_vs_fp32", "speedup_vs_reference_fp32"] if paired else []
    out = []
    for dtype in dict.fromkeys(r.dtype for r in records):
        rows = []
        groups = _groups([r for r in records if r.dtype == dtype], "case", "batch", "mode")
        for (case, batch, mode), recs in groups.items():
            any_r = next(iter(recs.values()))
            auto = recs.get("fused_auto")
            spread = max((((r.q3_ms - r.q1_ms) / r.median_ms) for r in recs.values()
                          if r.median_ms == r.median_ms and r.median_ms > 0), default=math.nan)
            mem = "/".join(fmt(recs[p].saved_mb, 2) if p in recs else "-"
                           for p in (any_r.baseline, "reference", "fused_auto"))
            rows.append([case, any_r.extra, batch, mode]
                        + [fmt(recs[p].median_ms) if p in recs and not recs[p].error else ("err" if p in recs else "")
                           for p in providers]
                        + [fmt(getattr(auto, f), 2) if auto else "-" for f in ratio_fields]
                        + [mem, f"{spread * 100:.0f}%" if spread == spread else "-", fmt(any_r.load1, 1)])
        headers = (["layer", "d_in->d_out", "batch", "mode"] + [short(p) for p in providers]
                   + ["auto/base", "(min)", "ref/auto", "(min)"] + (["fp32/auto", "ref32/auto"] if paired else [])
                   + ["savedMB base/ref/auto", "IQR", "load"])
        out.append(f"Layer level, {dtype}: median ms per call (N = batch*197 tokens); base = lin (linF in mode frozen)")
        out.append(render_table(headers, rows, left=2))
        for r in records:
            if r.dtype == dtype and r.error:
                out.append(f"  error: {r.case} b{r.batch} {r.mode} {r.provider}: {r.error}")
        out.append("")
    out.append("auto/base: time of FusedSpectralLinear (auto backend) / nn.Linear (<1 faster); ref/auto: speedup "
               "over the reference F.linear(x, U@diag(s)@Vh, b); (min): from each provider's fastest round. IQR: the "
               "widest interquartile range / median of the row. load: 1-min load average (2 shared cores: contention)."
               + (" fp32/auto: fused_auto's fp32 time over its time in this precision; ref32/auto: the reference's "
                  "fp32 time over it (paired, one interleaved loop; 'autocast': fp32 layers under autocast)."
                  if paired else ""))
    return "\n".join(out)


def _flop_ratio(records: list, r) -> float:
    ref = next((x for x in records if x.case == r.case and x.batch == r.batch and x.dtype == r.dtype
                and x.provider == "imse_reference"), None)
    return ref.gflop / r.gflop if ref is not None and r.gflop > 0 else math.nan


def model_table(records: list) -> str:
    mixed = any(r.dtype != "fp32" for r in records) and any(r.dtype == "fp32" for r in records)
    rows = []
    for r in records:
        rows.append([r.case, r.batch, r.dtype, r.provider, r.mode,
                     "err" if r.error else fmt(r.median_ms), f"{fmt(r.q1_ms)}-{fmt(r.q3_ms)}", fmt(r.items_per_s, 2),
                     fmt(r.speedup_vs_reference, 2), fmt(r.speedup_vs_reference_min, 2)]
                    + ([fmt(r.speedup_vs_fp32, 2), fmt(r.speedup_vs_fp32_min, 2), fmt(r.speedup_vs_reference_fp32, 2),
                        fmt(r.speedup_vs_reference_fp32_min, 2)] if mixed else [])
                    + [fmt(r.gflop, 1), fmt(_flop_ratio(records, r), 2), fmt(r.saved_mb, 1), fmt(r.peak_mb, 1),
                       r.rounds, fmt(r.load1, 1)])
    headers = (["model", "batch", "prec", "provider", "mode", "median ms", "q1-q3", "img/s", "ref/x", "(min)"]
               + (["fp32/x", "(min)", "ref32/x", "(min)"] if mixed else [])
               + ["GFLOP", "flop ref/x", "savedMB", "peakMB", "rounds", "load"])
    method = next((r.peak_method for r in records if r.peak_method), "")
    note = ("ref/x: speedup over the reference-style step (imse_reference) in the same precision, medians of per-round "
            "ratios; (min): fastest rounds. "
            + ("fp32/x: speedup over the same provider in fp32; ref32/x: over the reference step in fp32 (every "
               "precision measured side by side in one interleaved loop; bf16/fp16 under imse_kernels.precision."
               "autocast, bf16-torch under plain torch.autocast). " if mixed else "")
            + "GFLOP: GEMM + convolution FLOPs of one call (attention excluded); flop ref/x: the reference's count "
            "over this one, the speedup if only GEMM work counted. "
            f"savedMB: peak of tensors held for backward over one call; peakMB: {method}")
    return "Model level: one call = one adaptation step (SAM: two forward+backward) or one inference\n" + \
        render_table(headers, rows, left=5) + "\n" + note + "\n" + "\n".join(
            f"  error: {r.case} b{r.batch} {r.provider}: {r.error}" for r in records if r.error)


def gflops_table(records: list) -> str:
    """Achieved GFLOP/s = GFLOP of one call / median time: layer level the nominal GEMM FLOPs of each
    provider's route (layer_cases.nominal_flops), model level the counted GEMM + convolution FLOPs."""
    def gflop(r):  # a run saved before layer records carried it: the same formula
        if r.level == "layer" and r.gflop != r.gflop and r.dtype in LC.DTYPES:
            return LC.nominal_flops(LC.Case(*r.case.split("."), r.batch, r.mode, r.dtype), r.provider) / 1e9
        return r.gflop

    out = []
    for level in dict.fromkeys(r.level for r in records):
        recs = [r for r in records if r.level == level]
        providers = list(dict.fromkeys(r.provider for r in recs))
        rows = [list(key) + [fmt(gflop(g[p]) / (g[p].median_ms / 1e3), 1) if p in g and g[p].median_ms > 0 else ""
                             for p in providers]
                for key, g in _groups(recs, "case", "batch", "mode", "dtype").items()]
        what = "nominal GEMM FLOPs of the route" if level == "layer" else "counted GEMM + convolution FLOPs"
        out += [f"Achieved GFLOP/s, {level} level ({what} / median time)",
                render_table(["case", "batch", "mode", "dtype"] + [short(p) for p in providers], rows, left=4), ""]
    return "\n".join(out).rstrip()


# --------------------------------------------------------------------------------------------
# Targets (targets.json): printed, never asserted

def _find(records, **kw):
    return [r for r in records if all(getattr(r, k) == v for k, v in kw.items()) and not r.error]


def load_targets(device: str, path: Path = TARGETS) -> list:
    return json.loads(path.read_text())[device]


_MATCH_FIELDS = ("case", "batch", "mode", "dtype", "provider")


def bars_report(layer: list, model: list, device: str, targets: Optional[list] = None) -> str:
    lines = [f"Targets ({TARGETS.name}); value = median of paired ratios, [min-round ratio]; "
             "the worst matching case counts:"]
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
    for key, recs in _groups([r for r in layer if not r.error], "case", "batch", "mode", "dtype").items():
        fused = [r.median_ms for p, r in recs.items()
                 if p.startswith("fused_") and p != "fused_auto" and not p.endswith(("_F", "_R"))]
        if "fused_auto" in recs and fused:
            worst = max(worst or (0, None), (recs["fused_auto"].median_ms / min(fused), key))
    if worst:
        lines.append(f"  {'PASS' if worst[0] <= 1.05 else 'FAIL'}  auto vs best backend (median ms ratio): "
                     f"{worst[0]:.2f} <= 1.05 (worst: {worst[1]})")
    for r in _find(model, provider="imse"):
        ref = _find(model, provider="imse_reference", case=r.case, batch=r.batch, dtype=r.dtype)
        if ref and r.peak_mb == r.peak_mb:
            ok = r.peak_mb <= ref[0].peak_mb
            lines.append(f"  {'PASS' if ok else 'FAIL'}  peak memory imse <= reference, {r.case} b{r.batch} {r.dtype}: "
                         f"{r.peak_mb:.0f} vs {ref[0].peak_mb:.0f} MB")
    return lines


def gap_report(layer: list, limit: int = 16, threshold: float = 1.10) -> str:
    """Where fused_auto is slower than the FLOP model says it should be (planner.step_flops, best route,
    over nn.Linear's FLOPs): gap = measured time ratio / FLOP ratio. Targets for kernels and planner."""
    rows = []
    for r in layer:
        if r.provider != "fused_auto" or r.error or r.dtype not in LC.DTYPES:
            continue
        net, lay = r.case.split(".")
        try:
            route, model = LC.flop_model(LC.Case(net, lay, r.batch, r.mode, r.dtype))
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
        ax.bar(range(len(rs)), [r.ratio_vs_baseline for r in rs], label="auto / nn.Linear")
        ax.bar(range(len(rs)), [1 / r.speedup_vs_reference if r.speedup_vs_reference else math.nan for r in rs],
               alpha=0.4, label="auto / reference")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rs)), [f"{r.case}\nb{r.batch} {r.dtype}" for r in rs], fontsize=6)
        ax.set_title(f"mode {mode}: time ratio (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def header_line(env: dict, device: str, tag: str, name: str = "throughput") -> str:
    return (f"imse_kernels {name}  device={device}  machine={tag}  torch {env['torch']}  "
            f"triton {env['triton']}  commit {str(env['git_commit'])[:10]}{'+dirty' if env['git_dirty'] else ''}  "
            f"threads {env['torch_threads']}  OMP_WAIT_POLICY {env.get('omp_wait_policy', '?')}  "
            f"backends {','.join(k for k, v in env['backends'].items() if v is None)}")


def render(header: str, records: list, device: str, footer: str, gflops: bool = False) -> str:
    layer = [r for r in records if r.level == "layer"]
    model = [r for r in records if r.level == "model"]
    text = [header, ""]
    if layer:
        text += [layer_table(layer, list(dict.fromkeys(r.provider for r in layer))), ""]
    if model:
        text += [model_table(model), ""]
    if gflops and records:
        text += [gflops_table(records), ""]
    text += [bars_report(layer, model, device), ""]
    if layer:
        text += [gap_report(layer), ""]
    return "\n".join(text + [footer])


# --------------------------------------------------------------------------------------------
# Files: <stem>.{json,csv,txt}; merging a rerun into a saved run

def write_outputs(out_dir: Path, stem: str, env: dict, config: dict, records: list, text: str) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in records]
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "txt")]
    paths[0].write_text(json.dumps({"env": env, "config": config, "results": rows}, indent=1, default=str) + "\n")
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Record.__dataclass_fields__))
        w.writeheader()
        w.writerows(rows)
    paths[2].write_text(text)
    return paths


def load_records(path: Path):
    data = json.loads(path.read_text())
    fields = Record.__dataclass_fields__
    records = [Record(**{k: (math.nan if v is None and fields[k].type in (float, "float") else v)
                         for k, v in row.items() if k in fields}) for row in data["results"]]
    return data, records


def _name_tag(path: Path) -> tuple:
    name, _, tag = path.stem.partition("_")
    return name, tag


def merge_records(path: Path, new: list, env: dict, device: str, gflops: bool = False):
    """Replace the rows of `path` whose case (level, case, batch, mode, dtype) was measured again."""
    data, old = load_records(path)
    key = lambda r: (r.level, r.case, r.batch, r.mode, r.dtype)  # noqa: E731
    fresh = {key(r) for r in new}
    merged, pending = [], {k: [r for r in new if key(r) == k] for k in dict.fromkeys(key(r) for r in new)}
    for r in old:
        merged += pending.pop(key(r), []) if key(r) in fresh else [r]
    for rs in pending.values():
        merged += rs
    first_env = data["env"]
    first_env.setdefault("reruns", []).append({"timestamp": env["timestamp"], "git_commit": env["git_commit"],
                                               "git_dirty": env["git_dirty"], "cases": len(fresh),
                                               "argv": sys.argv[1:]})
    name, tag = _name_tag(path)
    text = render(header_line(first_env, device, tag, name), merged, device,
                  f"merged: {len(fresh)} cases re-measured {env['timestamp']} (commit {str(env['git_commit'])[:10]}) "
                  f"replace those of the first run; see env.reruns in the JSON", gflops)
    return merged, first_env, data.get("config", {}), text


def rerender(path: Path, save: bool = True, gflops: bool = False, plot_png: bool = False) -> int:
    """Re-render the tables of a saved JSON (after a change to the report, without measuring again)."""
    data, records = load_records(path)
    env, device = data["env"], data["env"].get("device", "cpu")
    name, tag = _name_tag(path)
    text = render(header_line(env, device, tag, name), records, device, f"(re-rendered from {path.name})", gflops)
    print(text)
    if save:
        path.with_suffix(".txt").write_text(text + "\n")
        print(f"wrote {path.with_suffix('.txt')}")
    if plot_png:
        plot(records, path.with_suffix(".png"))
    return 0


# --------------------------------------------------------------------------------------------
# The run wrapper every script measures through

class _Interrupted(BaseException):  # not an Exception: provider error handlers must not swallow it
    pass


def _on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM kills
    raise _Interrupted()


def run(args, measures: list, name: str, note: Optional[str] = None) -> int:
    """Say what is measured, run each `measure(records, log)`, print the report, write <name>_<tag> files.

    A TERM (e.g. `timeout` in checks/gpu_check.sh) stops measuring; what was measured is still written (rc 3)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, t_start = args.device, time.perf_counter()
    env = env_info(device)
    header = header_line(env, device, machine_tag(device), name) + "\n" + install_banner(env["install"])
    print(header, flush=True)
    if note:
        print(note, flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    records, interrupted = [], None
    signal.signal(signal.SIGTERM, _on_term)
    try:
        for measure in measures:
            measure(records, log)
    except (_Interrupted, KeyboardInterrupt) as exc:
        interrupted = type(exc).__name__
        log(f"interrupted ({interrupted}): writing the {len(records)} results measured so far")
    footer = f"total {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.1f}"
    if interrupted:
        footer += f"; INTERRUPTED ({interrupted}): partial results"
    text = render(header, records, device, footer, args.gflops)
    print("\n" + text, flush=True)
    if args.no_save:
        if args.plot:
            print("--plot with --no-save: nothing written")
        return 3 if interrupted else 0
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    stem = f"{name}_{args.tag or machine_tag(device)}" + (
        "_quick" if args.quick else "_headline" if getattr(args, "headline", False) else "")
    config = dict(vars(args), interrupted=interrupted)
    if args.merge and (out_dir / f"{stem}.json").exists():
        records, env, config, text = merge_records(out_dir / f"{stem}.json", records, env, device, args.gflops)
        print("\n" + text, flush=True)
    paths = write_outputs(out_dir, stem, env, config, records, text + "\n")
    if args.plot:
        plot(records, out_dir / f"{stem}.png")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 3 if interrupted else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a saved run, e.g. benchmarks/results/throughput_<machine>.json")
    ap.add_argument("--no-save", action="store_true", help="print only (default: rewrite its .txt)")
    ap.add_argument("--gflops", action="store_true", help="add the achieved GFLOP/s table")
    ap.add_argument("--plot", action="store_true", help="write its .png (needs matplotlib)")
    args = ap.parse_args(argv)
    return rerender(Path(args.json), save=not args.no_save, gflops=args.gflops, plot_png=args.plot)


if __name__ == "__main__":
    sys.exit(main())
