"""Runs one method over a stream: predictions, accuracy per segment, shift events, speed and memory."""
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .metrics import PeakMemory
from .progress import Progress
from .streams import Segment, Stream

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MethodResult:
    method: str
    correct: list[int]
    total: list[int]
    batches: list[int]
    seconds: float
    peak_mib: Optional[float]
    start_mib: float
    memory_kind: str
    shift_batches: Optional[list[int]] = None  # global batch indices of declared shifts (None: no detector)
    events: list[dict] = field(default_factory=list)
    skipped_steps: int = 0

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


def run_method(name: str, adapter, stream: Stream, domain_of: Callable[[Segment], object], batch_size: int,
               device: torch.device, amp: Optional[str] = None, show_progress: bool = True) -> MethodResult:
    """Feed every segment's batches to `adapter(x)`; reset it at boundaries when the setting says so.

    Only the adapter call is timed (after moving the batch to the device; synchronised on CUDA).
    """
    autocast = (torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext())
    has_detector = hasattr(adapter, "events")
    sizes = [len(domain_of(s)) if s.count < 0 else s.count for s in stream.segments]
    n_batches = [-(-n // batch_size) for n in sizes]
    bar = Progress(sum(n_batches), name) if show_progress else None
    correct, total, events, shifts = [], [], [], []
    seconds, offset, gbatch = 0.0, 0, 0
    with PeakMemory(device) as mem:
        for i, seg in enumerate(stream.segments):
            if stream.resets_at_boundaries and i > 0:
                _collect_events(adapter, offset, events, shifts)
                adapter.reset()
                offset = gbatch
            c = t = 0
            for x, y in domain_of(seg).batches(batch_size, seg.start, seg.count):
                x = x.to(device, non_blocking=True)
                _sync(device)
                t0 = time.perf_counter()
                with autocast:
                    logits = adapter(x)
                _sync(device)
                seconds += time.perf_counter() - t0
                c += int((logits.argmax(1).cpu() == y).sum())
                t += len(y)
                gbatch += 1
                if bar is not None:
                    bar.update(1, f"{seg.label(stream.setting)} acc {c / t:.2f}")
            correct.append(c)
            total.append(t)
        peak = mem.peak_mib()
    _collect_events(adapter, offset, events, shifts)
    if bar is not None:
        bar.close()
    return MethodResult(name, correct, total, n_batches, seconds, peak, mem.start_mib, mem.kind,
                        sorted(shifts) if has_detector and not stream.resets_at_boundaries else None, events,
                        int(getattr(adapter, "skipped_steps", 0)))
