"""The run stage: one method over a stream (`run_method`: predictions, accuracy per segment, shift events,
speed and memory), and every method of a run on one seed's stream (`run_seed`)."""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from .. import provenance as prov
from ..tta import IMSEConfig
from . import distributed as dist_eval
from .methods import build_method
from .metrics import PeakMemory, shift_count, shift_detection
from .progress import Progress
from .streams import DIRICHLET_SETTINGS, Segment, Stream, build_stream, segment_batches, true_boundaries

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MethodResult:
    method: str
    correct: list[int]
    total: list[int]
    batches: list[int]  # per segment: the batches holding any of its images
    seconds: float
    peak_mib: Optional[float]
    start_mib: float
    memory_kind: str
    shift_batches: Optional[list[int]] = None  # global batch indices of declared shifts (None: no detector)
    events: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    stream_batches: int = 0  # batches in the whole stream (0: sum(batches), a segment list's)
    config: dict = field(default_factory=dict)  # the method's hyper-parameters (provenance.method_config)

    def __post_init__(self):
        if not self.stream_batches:
            self.stream_batches = sum(self.batches)

    @property
    def accuracy(self) -> list[float]:
        return [c / t if t else float("nan") for c, t in zip(self.correct, self.total)]

    @property
    def mean_accuracy(self) -> float:
        acc = self.accuracy
        return sum(acc) / len(acc)

    @property
    def images(self) -> int:
        return sum(self.total)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _collect_events(adapter, offset: int, into: list[dict], shifts: list[int]) -> None:
    for e in getattr(adapter, "events", None) or []:
        batch = e.batch + offset if e.batch >= 0 else e.batch
        into.append({"batch": batch, "kind": e.kind, "entry": e.entry, "kl": e.kl,
                     "weights": {str(k): round(v, 4) for k, v in (e.weights or {}).items()}})
        if e.kind == "shift":
            shifts.append(batch)


def take(domain, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `indices` of a domain, in that order: `domain.get` where it has one, else one-image batches."""
    get = getattr(domain, "get", None)
    if get is not None:
        return get(list(indices))
    xs, ys = [], []
    for i in indices:
        x, y = next(iter(domain.batches(1, int(i), 1)))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def schedule_batches(stream: Stream, domain_of: Callable[[Segment], object]
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, segment index per image) of every batch of a scheduled stream."""
    domains = {}
    for batch in stream.schedule:
        segs = torch.tensor([s for s, _ in batch], dtype=torch.long)
        parts = {}
        for s in dict.fromkeys(int(s) for s in segs):
            if s not in domains:
                domains[s] = domain_of(stream.segments[s])
            pos = (segs == s).nonzero().flatten()
            parts[s] = (pos, take(domains[s], [batch[p][1] for p in pos.tolist()]))
        if len(parts) == 1:
            ((_, (x, y)),) = parts.values()
        else:
            first = next(iter(parts.values()))[1]
            x = first[0].new_empty((len(batch),) + tuple(first[0].shape[1:]))
            y = first[1].new_empty((len(batch),))
            for pos, (xs, ys) in parts.values():
                x[pos], y[pos] = xs, ys
        yield x, torch.as_tensor(y), segs


def run_method(name: str, adapter, stream: Stream, domain_of: Callable[[Segment], object], batch_size: int,
               device: torch.device, amp: Optional[str] = None, show_progress: bool = True,
               config: Optional[dict] = None, label: Optional[str] = None) -> MethodResult:
    """Feed every segment's batches (or a scheduled stream's batches) to `adapter(x)`; reset it at boundaries
    when the setting says so. In a scheduled stream every image counts for its own segment (domain), also
    in a batch that mixes domains.

    `config` (the method's hyper-parameters) is kept in the result; `label` names the progress bar.
    Only the adapter call is timed (after moving the batch to the device; synchronised on CUDA).
    """
    autocast = (torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext())
    has_detector = hasattr(adapter, "events")
    if stream.schedule is None:
        sizes = [len(domain_of(s)) if s.count < 0 else s.count for s in stream.segments]
        n_batches = segment_batches(stream, sizes, batch_size)
        total_batches = sum(n_batches)
    else:
        n_batches = segment_batches(stream)
        total_batches = len(stream.schedule)
    bar = Progress(total_batches, label or name) if show_progress else None
    n_seg = len(stream.segments)
    correct, total, events, shifts = [0] * n_seg, [0] * n_seg, [], []
    seconds, offset, gbatch = 0.0, 0, 0

    def step(x: torch.Tensor) -> torch.Tensor:
        nonlocal seconds
        x = x.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            logits = adapter(x)
        _sync(device)
        seconds += time.perf_counter() - t0
        return logits.argmax(1).cpu()

    with PeakMemory(device) as mem:
        if stream.schedule is None:
            for i, seg in enumerate(stream.segments):
                if stream.resets_at_boundaries and i > 0:
                    _collect_events(adapter, offset, events, shifts)
                    adapter.reset()
                    offset = gbatch
                c = t = 0
                for x, y in domain_of(seg).batches(batch_size, seg.start, seg.count):
                    c += int((step(x) == y).sum())
                    t += len(y)
                    gbatch += 1
                    if bar is not None:
                        bar.update(1, f"{seg.label(stream.setting)} acc {c / t:.2f}")
                correct[i], total[i] = c, t
        else:
            for x, y, segs in schedule_batches(stream, domain_of):
                hit = (step(x) == y).long()
                for s, c in zip(segs.tolist(), hit.tolist()):
                    correct[s] += c
                    total[s] += 1
                gbatch += 1
                if bar is not None:
                    bar.update(1, f"acc {sum(correct) / max(sum(total), 1):.2f}")
        peak = mem.peak_mib()
    _collect_events(adapter, offset, events, shifts)
    if bar is not None:
        bar.close()
    return MethodResult(name, correct, total, n_batches, seconds, peak, mem.start_mib, mem.kind,
                        sorted(shifts) if has_detector and not stream.resets_at_boundaries else None, events,
                        int(getattr(adapter, "skipped_steps", 0)), total_batches, dict(config or {}))


@dataclass
class SeedRun:
    """Every method of a run on one seed's stream, and the shift detectors' scores against its boundaries."""

    seed: int
    stream: Stream
    results: list[MethodResult]
    boundaries: Optional[list[int]]   # true domain boundaries (batch indices); None on a mixed stream
    detection: dict                   # method -> shift_detection (or shift_count on a mixed stream) or None
    tolerance: int                    # batches within which a declared shift matches a boundary


def _labels(domains) -> Optional[list]:
    labels = getattr(domains, "labels", None)
    if labels is None and hasattr(domains, "test"):
        labels = domains.test.labels
    return None if labels is None else [int(y) for y in labels]


def score_seed(seed: int, stream: Stream, results: list, configs: dict, batch_size: int) -> SeedRun:
    """The methods' results on one seed's stream with the shift detectors scored against its boundaries (or the
    declared shifts counted on a mixed stream); `configs` are the run's method configs (IMSE's window)."""
    imse = [c for c in configs.values() if isinstance(c, IMSEConfig)]
    window = imse[0].stats_window if imse else IMSEConfig().stats_window  # a shift shows once the window is new
    tolerance = max(1, math.ceil(window / batch_size))
    if stream.mixes_domains:
        boundaries = None
        detection = {r.method: (shift_count(r.shift_batches, r.stream_batches)
                                if r.shift_batches is not None else None) for r in results}
    else:
        boundaries = true_boundaries(results[0].batches, stream.segments)
        detection = {r.method: (shift_detection(r.shift_batches, boundaries, tolerance, r.stream_batches)
                                if r.shift_batches is not None else None) for r in results}
    return SeedRun(seed, stream, list(results), boundaries, detection, tolerance)


def run_seed(run, opts, domains, domain_size: int, model, source, device: torch.device, seed: int, comm=None,
             log: Callable[[str], None] = print, show_progress: bool = True, tag: str = "",
             on_result: Optional[Callable[[SeedRun], None]] = None) -> SeedRun:
    """`run` (an `eval.run_config.RunConfig`) on `seed`'s stream over `domains` (`domains.domain(corruption,
    severity)`): each method built by `build_method(name, model, opts, source)` after `torch.manual_seed(seed)`,
    wrapped for the process group `comm` when there is one. `on_result` is called after each method with the
    seed's run so far (the results files are written as each method finishes)."""
    labels = _labels(domains) if run.setting in DIRICHLET_SETTINGS else None
    stream = build_stream(run.setting, list(run.corruptions), run.severity, run.rounds, domain_size, run.batch_size,
                          labels, run.dirichlet, seed)
    domain_of = lambda seg: domains.domain(seg.corruption, seg.severity)  # noqa: E731
    results = []
    for name in run.methods:
        torch.manual_seed(seed)
        adapter = build_method(name, model, opts, source)
        config = prov.method_config(adapter)
        if comm is not None:
            adapter = dist_eval.Sharded(adapter, comm)
        results.append(run_method(name, adapter, stream, domain_of, run.batch_size, device, run.amp,
                                  show_progress=show_progress, config=config, label=name + tag))
        r = results[-1]
        log(f"{name}{tag}: mean accuracy {100 * r.mean_accuracy:.1f}% ({r.images_per_s:.0f} images/s)")
        del adapter
        if on_result is not None:
            on_result(score_seed(seed, stream, results, opts.configs, run.batch_size))
    return score_seed(seed, stream, results, opts.configs, run.batch_size)
