"""Shift-detection scoring and peak-memory measurement."""
from typing import Optional, Sequence

import torch

from ..proc_status import proc_status_kib


def shift_detection(detected: Sequence[int], boundaries: Sequence[int], tolerance: int = 1) -> dict:
    """Match detected shift batches to true boundary batches.

    A detection at batch d matches boundary b when b <= d < b + tolerance (and before the next boundary);
    each boundary and each detection match at most once. precision = matched / detections,
    recall = matched / boundaries (None when the denominator is 0).
    """
    if tolerance < 1:
        raise ValueError(f"tolerance must be >= 1 batch, got {tolerance}")
    det = sorted(set(int(d) for d in detected))
    bnd = sorted(int(b) for b in boundaries)
    used: set[int] = set()
    matched = []
    for i, b in enumerate(bnd):
        end = min(b + tolerance, bnd[i + 1] if i + 1 < len(bnd) else b + tolerance)
        hit = next((d for d in det if b <= d < end and d not in used), None)
        if hit is not None:
            used.add(hit)
            matched.append((b, hit))
    tp = len(matched)
    return {
        "boundaries": bnd, "detected": det, "matched": matched, "tolerance_batches": tolerance,
        "precision": tp / len(det) if det else None,
        "recall": tp / len(bnd) if bnd else None,
        "false_alarms": len(det) - tp, "missed": len(bnd) - tp,
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
