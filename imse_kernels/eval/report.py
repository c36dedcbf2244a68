"""Results as a text table, JSON, CSV and (when matplotlib is importable) a PNG plot.

Files are written atomically (`imse_kernels.state_file`): an interrupted run never leaves half a file.
"""
import csv
import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from ..state_file import atomic_write_bytes, atomic_write_text
from .runner import MethodResult
from .streams import Stream


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(stream: Stream, results: Sequence[MethodResult], detection: dict[str, Optional[dict]]) -> str:
    """Per-segment accuracy (%) per method, then mean accuracy/error, shift detection, speed and memory."""
    names = [r.method for r in results]
    labels = [s.label(stream.setting) for s in stream.segments]
    w0 = max([len(x) for x in labels] + [22])
    w = max([len(n) for n in names] + [8]) + 1
    lines = ["accuracy (%)".ljust(w0) + "".join(n.rjust(w) for n in names)]
    for i, lab in enumerate(labels):
        lines.append(lab.ljust(w0) + "".join(_fmt(100 * r.accuracy[i], ".1f").rjust(w) for r in results))
    lines.append("-" * (w0 + w * len(names)))
    rows = [
        ("mean accuracy (%)", [100 * r.mean_accuracy for r in results], ".1f"),
        ("mean error (%)", [100 - 100 * r.mean_accuracy for r in results], ".1f"),
        ("shift precision", [(detection.get(r.method) or {}).get("precision") for r in results], ".2f"),
        ("shift recall", [(detection.get(r.method) or {}).get("recall") for r in results], ".2f"),
        ("shifts declared", [None if detection.get(r.method) is None else len(detection[r.method]["detected"])
                             for r in results], "d"),
        ("images/s", [r.images_per_s for r in results], ".1f"),
        ("peak CUDA memory (MiB)" if results[0].memory_kind.startswith("cuda") else "peak process RSS (MiB)",
         [r.peak_mib for r in results], ".0f"),
    ]
    for label, vals, spec in rows:
        lines.append(label.ljust(w0) + "".join(_fmt(v, spec).rjust(w) for v in vals))
    return "\n".join(lines)


def payload(meta: dict, stream: Stream, results: Sequence[MethodResult], detection: dict) -> dict:
    """Everything measured, JSON-ready."""
    segs = [{"index": i, "label": s.label(stream.setting), "corruption": s.corruption, "severity": s.severity,
             "round": s.round, "start": s.start, "count": s.count} for i, s in enumerate(stream.segments)]
    methods = {}
    for r in results:
        methods[r.method] = {
            "accuracy": r.accuracy, "correct": r.correct, "total": r.total, "batches": r.batches,
            "mean_accuracy": r.mean_accuracy, "mean_error": 1 - r.mean_accuracy,
            "images": r.images, "seconds": r.seconds, "images_per_s": r.images_per_s,
            "peak_memory_mib": r.peak_mib, "memory_at_start_mib": r.start_mib, "memory_kind": r.memory_kind,
            "skipped_steps": r.skipped_steps, "shift_detection": detection.get(r.method), "events": r.events,
        }
    return {"meta": meta, "segments": segs, "methods": methods}


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def write_csv(path: Path, stream: Stream, results: Sequence[MethodResult]) -> None:
    """One row per (method, segment); built in memory, then written atomically."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["method", "segment", "label", "corruption", "severity", "round", "correct", "total", "accuracy", "error"])
    for r in results:
        for i, s in enumerate(stream.segments):
            acc = r.accuracy[i]
            w.writerow([r.method, i, s.label(stream.setting), s.corruption, s.severity, s.round, r.correct[i],
                        r.total[i], f"{acc:.6f}", f"{1 - acc:.6f}"])
    atomic_write_text(path, buf.getvalue())


def plot(path: Path, stream: Stream, results: Sequence[MethodResult], title: str) -> Optional[str]:
    """Accuracy per segment per method, true boundaries dotted, declared shifts as triangles. Returns a
    reason string when it cannot (matplotlib missing), else None."""
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
        if not r.shift_batches:
            continue
        xs = []
        for b in r.shift_batches:  # in segment units: a shift on a segment's first batch sits on its left border
            k = max(i for i, s0 in enumerate(starts) if s0 <= b)
            xs.append(k - 0.5 + (b - starts[k]) / max(r.batches[k], 1))
        ax.scatter(xs, [2.5 + 3.5 * j] * len(xs), marker="v", s=22, color=line.get_color(), zorder=3,
                   label=f"{r.method}: shift declared")
    for k in range(1, len(labels)):
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
