"""The `multi_stream` setting: K streams, each its own random order of the domains, in mixed batches.

Every step takes the next `batch_size` images of each stream and interleaves them sample by sample
into one mixed batch of K · batch_size images. `MultiStreamIMSE` adapts on the mixed batches; K
separate `IMSE` adapters, each given only its own stream's images, are the reference: by the
adapter's contract (docs/design.md §8) both give the same predictions, so the table shows equal
accuracy side by side with the throughput of each.
"""
import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import provenance as prov
from ..backends import use_backend
from ..text_table import render_table
from ..tta import IMSE, IMSEConfig, MultiStreamIMSE
from .data_spec import images_per_domain
from .progress import Progress
from .report import header_lines, protocol_meta, provenance_record, write_json


@dataclass
class MultiStreamResult:
    method: str               # "multi_stream" or "separate"
    correct: list[int]        # per stream
    total: list[int]
    seconds: float            # adapter calls only
    max_logit_diff: Optional[float] = None  # against the other method, over every image

    @property
    def accuracy(self) -> list[float]:
        return [c / t if t else float("nan") for c, t in zip(self.correct, self.total)]

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)

    @property
    def images_per_s(self) -> float:
        return sum(self.total) / self.seconds if self.seconds > 0 else float("nan")


def stream_orders(corruptions: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """K random orders of the domains, one per stream (seeded, so every method sees the same)."""
    g = torch.Generator().manual_seed(seed)
    return [[corruptions[i] for i in torch.randperm(len(corruptions), generator=g).tolist()] for _ in range(k)]


def _stream_batches(domain_of: Callable[[str], object], order: Sequence[str], batch_size: int):
    for corruption in order:
        yield from domain_of(corruption).batches(batch_size)


def run_multi_stream(model: torch.nn.Module, domain_of: Callable[[str], object], corruptions: Sequence[str],
                     k: int, batch_size: int, device: torch.device, config: Optional[IMSEConfig] = None,
                     source: Optional[list] = None, seed: int = 0, show_progress: bool = True,
                     compile: "bool | str | dict" = False):
    """(orders, [multi_stream result, separate result]) over the same K streams; `compile` goes to every adapter."""
    if k < 1:
        raise ValueError(f"--streams must be >= 1, got {k}")
    orders = stream_orders(corruptions, k, seed)
    steps = []  # per step: K chunks (x, y), one per stream
    for chunks in zip(*(_stream_batches(domain_of, order, batch_size) for order in orders)):
        steps.append(list(chunks))
    multi = MultiStreamIMSE(copy.deepcopy(model), k, config, compile=compile)
    separate = [IMSE(copy.deepcopy(model), config, compile=compile) for _ in range(k)]
    if source is not None:
        multi.source_statistics(source)
        for a in separate:
            a.source_statistics(source)
    results = {m: MultiStreamResult(m, [0] * k, [0] * k, 0.0) for m in ("multi_stream", "separate")}
    max_diff = 0.0
    bar = Progress(len(steps), f"multi_stream K={k}") if show_progress else None
    for chunks in steps:
        n = min(len(y) for _, y in chunks)  # streams end a domain together: equal domain sizes
        x = torch.stack([c[0][:n] for c in chunks], 1).flatten(0, 1).to(device)  # sample-interleaved
        y = torch.stack([c[1][:n] for c in chunks], 1).flatten(0, 1)
        streams = torch.arange(k).repeat(n).to(device)
        t0 = time.perf_counter()
        logits_multi = multi(x, streams)
        _sync(device)
        t1 = time.perf_counter()
        logits_sep = torch.empty_like(logits_multi)
        for s, adapter in enumerate(separate):
            logits_sep[streams == s] = adapter(x[streams == s])
        _sync(device)
        t2 = time.perf_counter()
        results["multi_stream"].seconds += t1 - t0
        results["separate"].seconds += t2 - t1
        max_diff = max(max_diff, float((logits_multi - logits_sep).abs().max()))
        for name, logits in (("multi_stream", logits_multi), ("separate", logits_sep)):
            hit = (logits.argmax(1).cpu() == y)
            for s in range(k):
                results[name].correct[s] += int(hit[streams.cpu() == s].sum())
                results[name].total[s] += n
        if bar is not None:
            bar.update(1, f"acc {results['multi_stream'].mean_accuracy:.2f}")
    if bar is not None:
        bar.close()
    for r in results.values():
        r.max_logit_diff = max_diff
    return orders, list(results.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def multi_stream_table(orders: list[list[str]], results: list[MultiStreamResult]) -> str:
    """Per-stream and mean accuracy of each method, with its throughput."""
    k = len(orders)
    rows = [[r.method] + [f"{100 * a:.1f}" for a in r.accuracy] + [f"{100 * r.mean_accuracy:.1f}",
                                                                    f"{r.images_per_s:.1f}"] for r in results]
    lines = [render_table(["method"] + [f"s{s}" for s in range(k)] + ["mean", "img/s"], rows, sep="",
                          min_widths=[14] + [7] * k + [8, 9], header_rule=False)]
    speed = results[0].images_per_s / results[1].images_per_s
    lines.append(f"one batched step / {k} separate steps: {speed:.2f}x the throughput; max |logit difference| "
                 f"{results[0].max_logit_diff:.2e}")
    lines += [f"stream {s}: {' > '.join(o)}" for s, o in enumerate(orders)]
    return "\n".join(lines)


def evaluate_multi_stream(plan, session, t_start: float) -> dict:
    """`--setting multi_stream` (run and report): MultiStreamIMSE against K separate IMSE adapters on the same K
    streams, both with the run's `imse` config."""
    run = plan.run
    config = plan.config.methods["imse"]
    if config.batch_size is None:  # the learning rate's batch scaling follows the batch of each stream
        config = dataclasses.replace(config, batch_size=run.batch_size)
    data = session.data
    domains = data.domains(run.seeds[0])
    torch.manual_seed(run.seeds[0])
    backend = use_backend(run.backend) if run.backend else contextlib.nullcontext()
    with backend:
        orders, results = run_multi_stream(data.model, lambda c: domains.domain(c, run.severity), list(run.corruptions),
                                           run.streams, run.batch_size, session.device, config, data.source,
                                           run.seeds[0], show_progress=plan.invocation.progress, compile=run.compile)
    text = multi_stream_table(orders, results)
    meta = {"data": run.data, "setting": "multi_stream", "streams": run.streams, "severity": run.severity,
            "corruptions": list(run.corruptions), "batch_size_per_stream": run.batch_size, "seed": run.seeds[0],
            "compile": run.compile, "device": str(session.device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "imse_config": dataclasses.asdict(config), **data.info,
            **protocol_meta(session),
            "wall_seconds": round(time.perf_counter() - t_start, 1)}
    record = provenance_record(plan, session, {
        m: {"class": "MultiStreamIMSE" if m == "multi_stream" else "IMSE", "config": prov.jsonable(config),
            "streams": run.streams if m == "multi_stream" else 1} for m in ("multi_stream", "separate")},
        images_per_domain(domains))
    data_out = {"meta": meta, "config": plan.config.record(), "provenance": record, "orders": orders,
                "methods": {r.method: {
                    "accuracy": r.accuracy, "correct": r.correct, "total": r.total, "mean_accuracy": r.mean_accuracy,
                    "seconds": r.seconds, "images_per_s": r.images_per_s, "max_logit_diff": r.max_logit_diff}
                    for r in results},
                "table": text}
    out = Path(plan.invocation.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", data_out)
    print(f"{run.data} · multi_stream · K={run.streams} streams · severity {run.severity} · "
          f"{run.batch_size} images per stream per batch · seed {run.seeds[0]} · {session.device} · "
          f"{torch.get_num_threads()} threads")
    print(header_lines(session))
    print(prov.summary_line(record))
    print(text)
    print(f"wrote {out / 'results.json'}")
    print(f"wall time {meta['wall_seconds']:.1f} s")
    return data_out
