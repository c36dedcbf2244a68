"""Results as a text table, JSON, CSV and (when matplotlib is importable) a PNG plot.

Files are written atomically (`imse_kernels.state_file`): an interrupted run never leaves half a file.
"""
import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from ..state_file import atomic_write_bytes, atomic_write_text
from .runner import MethodResult
from .streams import Stream


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _det(detection: dict, r: MethodResult, key: str):
    return (detection.get(r.method) or {}).get(key)


def _detector_rows(results: Sequence, detection: dict, mixed: bool) -> list:
    """The shift-detection rows: precision, recall, delay and false positives; on a mixed stream (no
    boundaries) only how often a shift was declared."""
    declared = [None if detection.get(r.method) is None else len(detection[r.method]["detected"]) for r in results]
    per100 = [_det(detection, r, "shifts_per_100_batches") for r in results]
    if mixed:
        return [("shifts declared (no boundaries)", declared, "d"), ("shifts per 100 batches", per100, ".1f")]
    return [
        ("shift precision", [_det(detection, r, "precision") for r in results], ".2f"),
        ("shift recall", [_det(detection, r, "recall") for r in results], ".2f"),
        ("shifts declared", declared, "d"),
        ("detection delay mean (batches)", [_det(detection, r, "mean_delay_batches") for r in results], ".2f"),
        ("detection delay median", [_det(detection, r, "median_delay_batches") for r in results], ".1f"),
        ("false positives / 100 batches", [_det(detection, r, "false_positives_per_100_batches") for r in results],
         ".1f"),
    ]


def table(stream: Stream, results: Sequence[MethodResult], detection: dict[str, Optional[dict]]) -> str:
    """Per-segment accuracy (%) per method, then mean accuracy/error, shift detection, speed and memory."""
    names = [r.method for r in results]
    labels = [s.label(stream.setting) for s in stream.segments]
    w0 = max([len(x) for x in labels] + [30])
    w = max([len(n) for n in names] + [8]) + 1
    head = "accuracy (%)" + (" per domain" if stream.mixes_domains else "")
    lines = [head.ljust(w0) + "".join(n.rjust(w) for n in names)]
    for i, lab in enumerate(labels):
        lines.append(lab.ljust(w0) + "".join(_fmt(100 * r.accuracy[i], ".1f").rjust(w) for r in results))
    lines.append("-" * (w0 + w * len(names)))
    rows = [
        ("mean accuracy (%)", [100 * r.mean_accuracy for r in results], ".1f"),
        ("mean error (%)", [100 - 100 * r.mean_accuracy for r in results], ".1f"),
        *_detector_rows(results, detection, stream.mixes_domains),
        ("images/s", [r.images_per_s for r in results], ".1f"),
        ("peak CUDA memory (MiB)" if results[0].memory_kind.startswith("cuda") else "peak process RSS (MiB)",
         [r.peak_mib for r in results], ".0f"),
    ]
    for label, vals, spec in rows:
        lines.append(label.ljust(w0) + "".join(_fmt(v, spec).rjust(w) for v in vals))
    return "\n".join(lines)


def segments_payload(stream: Stream) -> list[dict]:
    return [{"index": i, "label": s.label(stream.setting), "corruption": s.corruption, "severity": s.severity,
             "round": s.round, "start": s.start, "count": s.count} for i, s in enumerate(stream.segments)]


def methods_payload(results: Sequence[MethodResult], detection: dict) -> dict:
    methods = {}
    for r in results:
        methods[r.method] = {
            "accuracy": r.accuracy, "correct": r.correct, "total": r.total, "batches": r.batches,
            "stream_batches": r.stream_batches,
            "mean_accuracy": r.mean_accuracy, "mean_error": 1 - r.mean_accuracy,
            "images": r.images, "seconds": r.seconds, "images_per_s": r.images_per_s,
            "peak_memory_mib": r.peak_mib, "memory_at_start_mib": r.start_mib, "memory_kind": r.memory_kind,
            "skipped_steps": r.skipped_steps, "shift_detection": detection.get(r.method), "events": r.events,
            "hyperparameters": r.config,
        }
    return methods


def payload(meta: dict, stream: Stream, results: Sequence[MethodResult], detection: dict,
            provenance: Optional[dict] = None) -> dict:
    """Everything measured, JSON-ready."""
    out = {"meta": meta}
    if provenance is not None:
        out["provenance"] = provenance
    out.update(segments=segments_payload(stream), methods=methods_payload(results, detection))
    return out


# ------------------------------------------------------------------------------------------- several seeds


def spread(values: Sequence[float]) -> dict:
    """mean, std (sample, ddof 1; 0 for one value), min, max of the finite values (None if there are none)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


DETECTION_KEYS = ("precision", "recall", "mean_delay_batches", "median_delay_batches",
                  "false_positives_per_100_batches", "shifts_per_100_batches")


def aggregate(runs: Sequence[tuple[int, Sequence[MethodResult], dict]]) -> dict:
    """Per method over the seeds' runs [(seed, results, detection), ...]: the spread of the mean accuracy
    (and per segment, of images/s, of the detector's scores), with the per-seed values."""
    out = {}
    for name in [r.method for r in runs[0][1]]:
        res = [next(r for r in rs if r.method == name) for _, rs, _ in runs]
        dets = [d.get(name) for _, _, d in runs]
        out[name] = {
            "seeds": [s for s, _, _ in runs],
            "mean_accuracy": {**spread([r.mean_accuracy for r in res]), "per_seed": [r.mean_accuracy for r in res]},
            "accuracy_per_segment": {k: [spread([r.accuracy[i] for r in res])[k] for i in range(len(res[0].accuracy))]
                                     for k in ("mean", "std", "min", "max")},
            "images_per_s": spread([r.images_per_s for r in res]),
            "shift_detection": None if all(d is None for d in dets) else {
                k: spread([(d or {}).get(k) for d in dets]) for k in DETECTION_KEYS},
        }
    return out


def seeds_table(stream: Stream, agg: dict) -> str:
    """The table over several seeds: per-segment mean accuracy, then mean ± std and min–max of each method's
    mean accuracy, the detector's scores averaged over the seeds, and images/s."""
    names = list(agg)
    labels = [s.label(stream.setting) for s in stream.segments]
    w0 = max([len(x) for x in labels] + [30])
    w = max([len(n) for n in names] + [11]) + 1
    n = len(agg[names[0]]["seeds"])
    lines = [f"accuracy (%), mean of {n} seeds".ljust(w0) + "".join(m.rjust(w) for m in names)]
    for i, lab in enumerate(labels):
        lines.append(lab.ljust(w0) + "".join(_fmt(_pct(agg[m]["accuracy_per_segment"]["mean"][i]), ".1f").rjust(w)
                                             for m in names))
    lines.append("-" * (w0 + w * len(names)))

    def cell(m, key, spec, scale=1.0):
        v = agg[m]["mean_accuracy"][key]
        return _fmt(None if v is None else scale * v, spec)

    lines.append("mean accuracy (%)".ljust(w0) + "".join(
        (cell(m, "mean", ".1f", 100) + " ± " + cell(m, "std", ".1f", 100)).rjust(w) for m in names))
    lines.append("  min – max".ljust(w0) + "".join(
        (cell(m, "min", ".1f", 100) + "–" + cell(m, "max", ".1f", 100)).rjust(w) for m in names))
    det_rows = ([("shifts per 100 batches", "shifts_per_100_batches", ".1f")] if stream.mixes_domains else
                [("shift precision", "precision", ".2f"), ("shift recall", "recall", ".2f"),
                 ("detection delay mean (batches)", "mean_delay_batches", ".2f"),
                 ("false positives / 100 batches", "false_positives_per_100_batches", ".1f")])
    for label, key, spec in det_rows:
        lines.append(label.ljust(w0) + "".join(
            _fmt((agg[m]["shift_detection"] or {}).get(key, {}).get("mean"), spec).rjust(w) for m in names))
    lines.append("images/s".ljust(w0) + "".join(_fmt(agg[m]["images_per_s"]["mean"], ".1f").rjust(w) for m in names))
    lines.append(f"(seeds {', '.join(str(s) for s in agg[names[0]]['seeds'])}; ± is the sample std over seeds)")
    return "\n".join(lines)


def _pct(v):
    return None if v is None else 100 * v


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def write_csv(path: Path, stream: Stream, results: Sequence[MethodResult], seed: Optional[int] = None,
              runs: Optional[Sequence[tuple[int, Sequence[MethodResult]]]] = None) -> None:
    """One row per (seed, method, segment); built in memory, then written atomically. `runs` (several seeds)
    replaces `results`/`seed`."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["method", "segment", "label", "corruption", "severity", "round", "correct", "total", "accuracy",
                "error", "setting", "seed"])
    for s_, rs in (runs if runs is not None else [(seed, results)]):
        for r in rs:
            for i, s in enumerate(stream.segments):
                acc = r.accuracy[i]
                w.writerow([r.method, i, s.label(stream.setting), s.corruption, s.severity, s.round, r.correct[i],
                            r.total[i], f"{acc:.6f}", f"{1 - acc:.6f}", stream.setting, "" if s_ is None else s_])
    atomic_write_text(path, buf.getvalue())


def plot(path: Path, stream: Stream, results: Sequence[MethodResult], title: str) -> Optional[str]:
    """Accuracy per segment per method, true boundaries dotted, declared shifts as triangles (neither on a
    mixed stream: its segments are domains, not stretches of time). `results` need `method`, `accuracy`,
    `mean_accuracy`, `shift_batches` and `batches`. Returns a reason string when it cannot (matplotlib
    missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG plot"
    labels = [s.label(stream.setting) for s in stream.segments]
    fig, ax = plt.subplots(figsize=(max(9, 0.6 * len(labels) + 3), 4.8))
    starts = [0]
    for n in results[0].batches[:-1]:
        starts.append(starts[-1] + n)
    for j, r in enumerate(results):
        (line,) = ax.plot(range(len(labels)), [100 * a for a in r.accuracy], marker="o", ms=3, lw=1.4,
                          label=f"{r.method} ({100 * r.mean_accuracy:.1f})")
        if not r.shift_batches or stream.mixes_domains:  # mixed batches: the x axis is not time
            continue
        xs = []
        for b in r.shift_batches:  # in segment units: a shift on a segment's first batch sits on its left border
            k = max(i for i, s0 in enumerate(starts) if s0 <= b)
            xs.append(k - 0.5 + (b - starts[k]) / max(r.batches[k], 1))
        ax.scatter(xs, [2.5 + 3.5 * j] * len(xs), marker="v", s=22, color=line.get_color(), zorder=3,
                   label=f"{r.method}: shift declared")
    for k in range(1, len(labels) if not stream.mixes_domains else 0):
        ax.axvline(k - 0.5, color="0.85", lw=0.6, ls=":")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return None
