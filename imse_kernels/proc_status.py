"""Fields of /proc/self/status: the process's memory as the kernel counts it (shared by eval and benchmarks)."""
from typing import Optional


def proc_status_kib(field: str) -> Optional[int]:
    """A kiB field of /proc/self/status (VmRSS, VmHWM, ...); None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
