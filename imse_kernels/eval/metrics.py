"""Shift-detection scoring and peak-memory measurement."""
import statistics
from typing import Optional, Sequence

import torch

from ..proc_status import proc_status_kib


def shift_detection(detected: Sequence[int], boundaries: Sequence[int], tolerance: int = 1,
                    n_batches: Optional[int] = None) -> dict:
    """Match detected shift batches to true boundary batches, and time the detector.

    A detection at batch d matches boundary b when b <= d < b + tolerance (and before the next boundary);
    each boundary and each detection match at most once. precision = matched / detections,
    recall = matched / boundaries (None when the denominator is 0).

    Delay: per matched boundary, d - b batches (0: declared on the boundary's own batch); their mean and
    median (None without a match). `first_detection_delays`: per boundary, the delay of the first declared
    shift from the boundary up to the next boundary (None where there is none), late ones included, so a
    detector that fires a few batches after the tolerance still shows how late it is.
    False positives per 100 batches: unmatched detections per 100 batches of the stream (`n_batches`;
    None when it is not given).
    """
    if tolerance < 1:
        raise ValueError(f"tolerance must be >= 1 batch, got {tolerance}")
    if n_batches is not None and n_batches < 0:
        raise ValueError(f"n_batches must be >= 0, got {n_batches}")
    det = sorted(set(int(d) for d in detected))
    bnd = sorted(int(b) for b in boundaries)
    used: set[int] = set()
    matched = []
    first = []
    for i, b in enumerate(bnd):
        nxt = bnd[i + 1] if i + 1 < len(bnd) else None
        end = min(b + tolerance, nxt if nxt is not None else b + tolerance)
        hit = next((d for d in det if b <= d < end and d not in used), None)
        if hit is not None:
            used.add(hit)
            matched.append((b, hit))
        late = next((d for d in det if d >= b and (nxt is None or d < nxt)), None)
        first.append(None if late is None else late - b)
    tp = len(matched)
    delays = [d - b for b, d in matched]
    false_alarms = len(det) - tp
    return {
        "boundaries": bnd, "detected": det, "matched": matched, "tolerance_batches": tolerance,
        "precision": tp / len(det) if det else None,
        "recall": tp / len(bnd) if bnd else None,
        "false_alarms": false_alarms, "missed": len(bnd) - tp,
        "delays_batches": delays,
        "mean_delay_batches": statistics.fmean(delays) if delays else None,
        "median_delay_batches": statistics.median(delays) if delays else None,
        "first_detection_delays": first,
        "n_batches": n_batches,
        "false_positives_per_100_batches": 100 * false_alarms / n_batches if n_batches else None,
        "shifts_per_100_batches": 100 * len(det) / n_batches if n_batches else None,
    }


def shift_count(detected: Sequence[int], n_batches: int) -> dict:
    """What can be said of a detector on a stream without domain boundaries (the mixed settings): how often it
    declares a shift. Same keys as `shift_detection`; the ones that need boundaries are None."""
    det = sorted(set(int(d) for d in detected))
    return {
        "boundaries": None, "detected": det, "matched": None, "tolerance_batches": None,
        "precision": None, "recall": None, "false_alarms": None, "missed": None,
        "delays_batches": None, "mean_delay_batches": None, "median_delay_batches": None,
        "first_detection_delays": None, "n_batches": n_batches, "false_positives_per_100_batches": None,
        "shifts_per_100_batches": 100 * len(det) / n_batches if n_batches else None,
    }


class PeakMemory:
    """Peak memory of a stretch of work: CUDA allocator peak on a GPU, else the process's resident-set
    high-water mark (Linux /proc; reset through clear_refs where the kernel allows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"
        self.start_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            rss = proc_status_kib("VmRSS")
            self.start_mib = (rss or 0) / 1024
        return self

    def __exit__(self, *exc):
        return False

    def peak_mib(self) -> Optional[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        hwm = proc_status_kib("VmHWM")
        if hwm is None:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return hwm / 1024
