"""The report stage: results as a text table, JSON, CSV and (when matplotlib is importable) a PNG plot.

Files are written atomically (`imse_kernels.state_file`): an interrupted run never leaves half a file.
`ResultsWriter` writes one run (one or several seeds) after each method and at the end, when it also prints
the table; every results.json holds the resolved config (`config`, readable by `imse-eval --config`), the
provenance record, the data protocol and the measurements.
"""
import csv
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import provenance as prov
from ..state_file import atomic_write_bytes, atomic_write_text
from ..text_table import RULE, render_table
from .runner import MethodResult, SeedRun
from .streams import DIRICHLET_SETTINGS, Stream


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


def _score(reports: str, accuracy: Optional[float]) -> Optional[float]:
    """An accuracy in [0, 1] as the table's number: error or accuracy in % (`protocol.DataProtocol.score`)."""
    if accuracy is None or (isinstance(accuracy, float) and math.isnan(accuracy)):
        return None
    return 100.0 * (1.0 - accuracy if reports == "error" else accuracy)


def table(stream: Stream, results: Sequence[MethodResult], detection: dict[str, Optional[dict]],
          reports: str = "accuracy") -> str:
    """Per-segment accuracy or error (%, `reports`) per method, then mean accuracy and error, shift detection,
    speed and memory."""
    names = [r.method for r in results]
    head = f"{reports} (%)" + (" per domain" if stream.mixes_domains else "")
    rows = [[s.label(stream.setting)] + [_fmt(_score(reports, r.accuracy[i]), ".1f") for r in results]
            for i, s in enumerate(stream.segments)]
    summary = [
        ("mean accuracy (%)", [100 * r.mean_accuracy for r in results], ".1f"),
        ("mean error (%)", [100 - 100 * r.mean_accuracy for r in results], ".1f"),
        *_detector_rows(results, detection, stream.mixes_domains),
        ("images/s", [r.images_per_s for r in results], ".1f"),
        ("peak CUDA memory (MiB)" if results[0].memory_kind.startswith("cuda") else "peak process RSS (MiB)",
         [r.peak_mib for r in results], ".0f"),
    ]
    rows += [RULE] + [[label] + [_fmt(v, spec) for v in vals] for label, vals, spec in summary]
    return _method_table(head, names, rows, 8)


def _method_table(head: str, names: Sequence[str], rows: list, min_width: int) -> str:
    """A label column (at least 30 wide), then one right-aligned column per method, all as wide as the widest
    name + 1 (at least `min_width` + 1), no separator."""
    w = max([len(n) for n in names] + [min_width]) + 1
    return render_table([head, *names], rows, sep="", min_widths=[30] + [w] * len(names), header_rule=False)


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


def seeds_table(stream: Stream, agg: dict, reports: str = "accuracy") -> str:
    """The table over several seeds: per-segment mean accuracy or error (`reports`), then mean ± std and min–max
    of each method's mean accuracy (and error), the detector's scores averaged over the seeds, and images/s."""
    names = list(agg)
    n = len(agg[names[0]]["seeds"])
    rows = [[s.label(stream.setting)]
            + [_fmt(_score(reports, agg[m]["accuracy_per_segment"]["mean"][i]), ".1f") for m in names]
            for i, s in enumerate(stream.segments)]
    rows.append(RULE)

    def cell(m, key, spec, scale=1.0):
        v = agg[m]["mean_accuracy"][key]
        return _fmt(None if v is None else scale * v, spec)

    def err(m, key):  # the error's mean, std, min and max from the accuracy's
        v = agg[m]["mean_accuracy"][{"min": "max", "max": "min"}.get(key, key)]
        return _fmt(None if v is None else (100 * v if key == "std" else 100 - 100 * v), ".1f")

    rows.append(["mean accuracy (%)"] + [cell(m, "mean", ".1f", 100) + " ± " + cell(m, "std", ".1f", 100)
                                         for m in names])
    rows.append(["  min – max"] + [cell(m, "min", ".1f", 100) + "–" + cell(m, "max", ".1f", 100) for m in names])
    if reports == "error":
        rows.append(["mean error (%)"] + [err(m, "mean") + " ± " + err(m, "std") for m in names])
        rows.append(["  min – max"] + [err(m, "min") + "–" + err(m, "max") for m in names])
    det_rows = ([("shifts per 100 batches", "shifts_per_100_batches", ".1f")] if stream.mixes_domains else
                [("shift precision", "precision", ".2f"), ("shift recall", "recall", ".2f"),
                 ("detection delay mean (batches)", "mean_delay_batches", ".2f"),
                 ("false positives / 100 batches", "false_positives_per_100_batches", ".1f")])
    for label, key, spec in det_rows:
        rows.append([label] + [_fmt((agg[m]["shift_detection"] or {}).get(key, {}).get("mean"), spec) for m in names])
    rows.append(["images/s"] + [_fmt(agg[m]["images_per_s"]["mean"], ".1f") for m in names])
    text = _method_table(f"{reports} (%), mean of {n} seeds", names, rows, 11)
    return text + f"\n(seeds {', '.join(str(s) for s in agg[names[0]]['seeds'])}; ± is the sample std over seeds)"


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


# ------------------------------------------------------------------------------------------- one whole run


@dataclass
class Plotted:
    """A method's line in the plot of several seeds: the mean over the seeds."""

    method: str
    accuracy: list
    mean_accuracy: float
    batches: list
    shift_batches: Optional[list] = None


def provenance_record(plan, session, method_configs: dict, images: int) -> dict:
    """The provenance of a run (`imse_kernels.provenance.collect`) with the command line it came from."""
    run, data = plan.run, session.data
    seeds = list(run.seeds)
    return prov.collect(model=data.model_name, checkpoint=data.checkpoint, device=session.device,
                        images_per_domain=images,
                        # run: corruption noise, image order and torch.manual_seed before each method
                        seeds={"run": seeds if len(seeds) > 1 else seeds[0], **data.fixed_seeds},
                        setting=run.setting, severity=run.severity,
                        dirichlet=run.dirichlet if run.setting in DIRICHLET_SETTINGS else None,
                        methods=method_configs, extra={"argv": list(plan.invocation.argv)})


def protocol_meta(session) -> dict:
    """What results.json records about the data protocol: the record, the pipeline's name, error or accuracy, and
    the warnings the set-up printed."""
    p = session.data.protocol
    return {"protocol": None if p is None else p.as_dict(),
            "preprocess": None if p is None or p.preprocess is None else p.preprocess["name"],
            "reports": "accuracy" if p is None else p.reports, "warnings": list(session.data.warnings)}


def _meta(plan, session, runs: Sequence[SeedRun], images: int) -> dict:
    run, first = plan.run, runs[0]
    lrs = {r.method: r.config.get("effective_lr") for r in first.results}
    meta = {
        "data": run.data, "setting": run.setting, "severity": run.severity, "corruptions": list(run.corruptions),
        "rounds": run.rounds if run.setting == "recurring" else None, "batch_size": run.batch_size,
        "seed": run.seeds[0], "amp": run.amp, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "backend": run.backend or os.environ.get("IMSE_BACKEND", "auto"),
        "device": str(session.device), "threads": torch.get_num_threads(), "methods": list(run.methods),
        "ranks": 1 if session.comm is None else session.comm.world_size,
        "effective_lr": lrs, "tent_lr": lrs.get("tent"), "imse_lr": lrs.get("imse"), "compile": run.compile,
        "torch": torch.__version__, **session.data.info, **protocol_meta(session),
        "images_per_domain": images,
        "dirichlet": run.dirichlet if run.setting in DIRICHLET_SETTINGS else None,
        "stream_batches": first.results[0].stream_batches,
        "stream_sha256": first.stream.fingerprint(),
        "true_boundaries": first.boundaries,
        "detection_tolerance_batches": None if first.stream.mixes_domains else first.tolerance,
        "wall_seconds": None,
    }
    if len(run.seeds) > 1:
        meta["seeds"] = list(run.seeds)
    return meta


class ResultsWriter:
    """A run's results.json and results.csv, written atomically after each method finishes (`partial`: the
    methods done so far, `meta.complete` false) so that a late failure loses nothing done, and at the end
    (`final`: also the printed table and the plot; it replaces the partial files)."""

    def __init__(self, plan, session, t_start: float):
        self.plan, self.session, self.t_start = plan, session, t_start
        self.out = Path(plan.invocation.output_dir)
        self.methods_written: list[str] = []   # the methods the files on disk hold
        self._record: Optional[dict] = None

    def _provenance(self, first: SeedRun, images: int) -> dict:
        if self._record is None:  # hashes the checkpoint and asks git once per run
            self._record = provenance_record(self.plan, self.session, {}, images)
        return {**self._record, "images_per_domain": images, "methods": {r.method: r.config for r in first.results}}

    def _write(self, runs: Sequence[SeedRun], images: int, complete: bool) -> tuple[dict, str]:
        plan, session = self.plan, self.session
        run, first = plan.run, runs[0]
        reports = protocol_meta(session)["reports"]
        meta = _meta(plan, session, runs, images)
        meta["complete"] = complete
        record = self._provenance(first, images)
        stream = first.stream
        self.out.mkdir(parents=True, exist_ok=True)
        meta["wall_seconds"] = round(time.perf_counter() - self.t_start, 1)
        if len(run.seeds) == 1:
            text = table(stream, first.results, first.detection, reports)
            data_out = payload(meta, stream, first.results, first.detection, record)
            write_csv(self.out / "results.csv", stream, first.results, first.seed)
        else:
            agg = aggregate([(r.seed, r.results, r.detection) for r in runs]) if complete else None
            text = seeds_table(stream, agg, reports) if agg else ""
            data_out = {"meta": meta, "provenance": record, "segments": segments_payload(stream),
                        "runs": [{"seed": r.seed, "stream_sha256": r.stream.fingerprint(),
                                  "true_boundaries": r.boundaries, "methods": methods_payload(r.results, r.detection)}
                                 for r in runs],
                        "aggregate": agg}
            write_csv(self.out / "results.csv", stream, [], runs=[(r.seed, r.results) for r in runs])
        data_out = {"meta": data_out.pop("meta"), "config": plan.config.record(), **data_out}
        write_json(self.out / "results.json", data_out)
        self.methods_written = [r.method for r in runs[-1].results]
        return data_out, text

    def partial(self, runs: Sequence[SeedRun], images: int) -> None:
        """The files with the methods done so far (`runs`: the finished seeds and the current one's methods)."""
        if self.session.reports:
            self._write(runs, images, complete=False)

    def final(self, runs: Sequence[SeedRun], images: int) -> dict:
        """Print the table and write results.json, results.csv and accuracy.png (on rank 0; the other ranks
        return the meta only). Returns the results payload, with the printed `table`."""
        plan, session = self.plan, self.session
        if not session.reports:
            meta = _meta(plan, session, runs, images)
            return {"meta": meta}  # every rank scored the whole stream; rank 0 writes it once
        run, first = plan.run, runs[0]
        data_out, text = self._write(runs, images, complete=True)
        meta, record, stream = data_out["meta"], data_out["provenance"], first.stream
        if len(run.seeds) == 1:
            plotted, seed_note = first.results, f"seed {first.seed}"
        else:
            agg = data_out["aggregate"]
            plotted = [Plotted(m, a["accuracy_per_segment"]["mean"], a["mean_accuracy"]["mean"], r.batches)
                       for (m, a), r in zip(agg.items(), first.results)]
            seed_note = f"seeds {','.join(map(str, run.seeds))} (mean)"
        dir_note = f" · dirichlet {run.dirichlet:g}" if run.setting in DIRICHLET_SETTINGS else ""
        plot_note = "disabled (--no-plot)" if not plan.invocation.plot else plot(
            self.out / "accuracy.png", stream, plotted,
            f"{run.data} · {run.setting}{dir_note} · severity {run.severity} · batch {run.batch_size} · {seed_note}")
        comm = session.comm
        header = (f"{run.data} · {run.setting}{dir_note} · severity {run.severity} · {len(stream.segments)} segments · "
                  f"{images} images per domain · batch {run.batch_size} · {seed_note} · {session.device} · "
                  f"{torch.get_num_threads()} threads"
                  + (f" · data-parallel over {comm.world_size} ranks ({comm.backend})" if comm is not None else ""))
        header += "\n" + header_lines(session)
        header += "\n" + prov.summary_line(record)
        print(header)
        print(text)
        if stream.mixes_domains:
            print("shift detection: a mixed stream has no domain boundaries; the table counts the declared shifts")
        else:
            print(f"shift detection: {len(first.boundaries)} true boundaries, a declared shift counts within "
                  f"{first.tolerance} batch(es) of one; delay = batches from the boundary to the matched detection; "
                  "false positives = unmatched detections")
        files = ["results.json", "results.csv"] + ([] if plot_note else ["accuracy.png"])
        print(f"wrote {', '.join(str(self.out / f) for f in files)}" + (f"; PNG: {plot_note}" if plot_note else ""))
        print(f"wall time {meta['wall_seconds']:.1f} s")
        data_out["table"] = text
        return data_out


def header_lines(session) -> str:
    """The data lines of the printed header: the protocol (data set, subset, images, order, pipeline, error or
    accuracy), the images checked up front, the embedded model's clean accuracy."""
    info, p = session.data.info, session.data.protocol
    lines = [p.header()] if p is not None else []
    check = info.get("image_check")
    if check:
        lines.append(f"images checked up front ({check['mode']}): {check['checked']:,} files, "
                     f"{check['skipped_count']} unreadable skipped")
    if "clean_test_accuracy" in info:
        lines.append(f"embedded ViT: clean test accuracy {100 * info['clean_test_accuracy']:.1f}% ({info['cache']})")
    return "\n".join(lines)
