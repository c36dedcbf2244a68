"""What /proc says about this process and machine: its memory as the kernel counts it, and the CPU model
(shared by eval and benchmarks)."""
import platform
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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
