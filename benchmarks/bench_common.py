"""Shared pieces of the benchmarks: what was measured, the one timing harness, memory probes, records, flags.

Timing (every script; results are ratios, never times, docs/design.md section 10): every provider of
one case is built and warmed up first, then `rounds` rounds run the providers one after another in a
rotated order, each a block of `number` calls (`number` calibrated so one block lasts about
`min_block_s`). Medians and quartiles are taken over the rounds; ratios are medians of the per-round
ratios (paired measurements, taken side by side), which cancels slow drifts of a shared, noisy
machine; the load average is recorded with each case. CPU blocks are timed with
`torch.utils.benchmark.Timer` (at torch's current thread count, not Timer's default of one), CUDA
blocks with `torch.cuda.Event`s.
"""
import argparse
import contextlib
import gc
import math
import os
import re
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# The benchmarks measure the INSTALLED imse_kernels (`pip install .`, or `pip install -e .`), never a
# source tree that happens to sit on sys.path: `python benchmarks/x.py` puts benchmarks/, not the repo,
# on sys.path. `describe_install()` says what was measured at the top of every run.
import torch  # noqa: E402
import torch.utils.benchmark as tbench  # noqa: E402

import imse_kernels  # noqa: E402
from imse_kernels import _extension, provenance  # noqa: E402
from imse_kernels.proc_status import cpu_model, proc_status_kib  # noqa: E402


def describe_install() -> dict:
    """Where imse_kernels was imported from, which backends run, and whether the compiled extension loaded."""
    package = Path(imse_kernels.__file__).resolve().parent
    return {
        "package_path": str(package),
        "editable_or_source_tree": (package.parent / "setup.py").exists(),
        "extension_C": _extension.reason("_C") or "loaded",
        "extension_C_cuda": _extension.reason("_C_cuda") or "loaded",
        "backends_available": imse_kernels.available_backends(),
    }


def install_banner(info: dict) -> str:
    """The lines every run starts with; loud when the compiled extension is missing."""
    lines = [f"measuring imse_kernels {imse_kernels.__version__} from {info['package_path']}"
             + (" (editable/source tree)" if info["editable_or_source_tree"] else " (installed copy)"),
             f"  compiled CPU extension (_C): {info['extension_C']}; "
             f"CUDA extension (_C_cuda): {info['extension_C_cuda']}",
             f"  backends available: {', '.join(info['backends_available'])}"]
    if info["extension_C"] != "loaded":
        bar = "!" * 100
        lines += [bar,
                  "!! WARNING: the compiled C++ extension is NOT loaded: the numbers below measure the pure-PyTorch",
                  "!! fallback, not the kernels. Install first: pip install .   (then run this script again)", bar]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Environment

def machine_tag(device: str) -> str:
    """A file-name-safe name for the machine: GPU name on CUDA, CPU model and core count on CPU."""
    if device == "cuda":
        name = "cuda-" + torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def env_info(device: str) -> dict:
    """The run's `env`: the library's provenance record of machine and software (`imse_kernels.provenance`,
    with the git commit of this checkout, whose scripts ran), plus what was measured: the imported package's
    version, its backends and where it was installed."""
    info = provenance.environment(device, root=REPO)
    info.update(imse_kernels=imse_kernels.__version__, backends=imse_kernels.backend_status(),
                install=describe_install())
    return info


# --------------------------------------------------------------------------------------------
# Timing

class BlockTimer:
    """Seconds per call of `fn`, over a block of `number` calls."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object], number: int) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.timeit(number).mean


@dataclass
class Timing:
    times: list = field(default_factory=list)  # seconds per call, one per round
    number: int = 1
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    def quartiles(self) -> tuple[float, float]:
        if len(self.times) < 2:
            m = self.median()
            return m, m
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[0], q[2]

    def min(self) -> float:
        return min(self.times) if self.times else math.nan

    def spread(self) -> float:
        """Interquartile range relative to the median."""
        lo, hi = self.quartiles()
        m = self.median()
        return (hi - lo) / m if m and m == m else math.nan


def measure_interleaved(fns: dict, device: str, rounds: int, min_block_s: float, warmup: int,
                        min_rounds: int = 3, max_case_s: float = math.inf, max_number: int = 1000,
                        log: Optional[Callable[[str], None]] = None) -> dict:
    """Time every callable in `fns` (name -> fn) side by side; returns name -> Timing.

    Each provider is called `warmup` times (at least once; the last call, timed, calibrates the block
    size). Then up to `rounds` rounds, stopping after `min_rounds` once `max_case_s` seconds have been
    spent in rounds. A provider that raises during warm-up is recorded with its error and left out.
    """
    block = BlockTimer(device)
    out = {name: Timing() for name in fns}
    for name, fn in fns.items():
        try:
            for _ in range(max(0, warmup - 1)):
                fn()
            t = block(fn, 1)
            out[name].number = max(1, min(max_number, math.ceil(min_block_s / max(t, 1e-9))))
        except Exception as exc:  # a provider may be unsupported for a dtype or shape
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            out[name].error = f"{type(exc).__name__}: {msg}"[:300]
            if log:
                log(f"    {name}: {out[name].error}")
    live = [n for n in fns if out[n].error is None]
    start = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() - start > max_case_s:
            break
        k = r % max(1, len(live))
        for name in live[k:] + live[:k]:
            out[name].times.append(block(fns[name], out[name].number))
    return out


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a/b (time ratio measured side by side); nan when either is missing."""
    if not (a.ok and b.ok):
        return math.nan
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def min_ratio(a: Timing, b: Timing) -> float:
    """Ratio of the fastest rounds: the least contended estimate on a shared machine."""
    if not (a.ok and b.ok):
        return math.nan
    return a.min() / b.min()


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


# --------------------------------------------------------------------------------------------
# Memory

class _Packed:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedTensorTracker:
    """Peak bytes of tensors held for backward (autograd's saved tensors), any device.

    Counts each storage once while at least one saved reference to it is alive; storages in
    `exclude` (the model's parameters and buffers) are not counted. This is the activation memory
    a training step holds, measured exactly, independent of allocators.
    """

    def __init__(self, exclude=()) -> None:
        # a callable is re-evaluated at every pack (tensors created during the call, e.g. a weight cache)
        self._exclude_fn = exclude if callable(exclude) else None
        self.exclude = set() if callable(exclude) else {self._ptr(t) for t in exclude if t is not None}
        self.live: dict[int, list] = {}
        self.current = 0
        self.peak = 0

    @staticmethod
    def _ptr(t) -> int:
        try:
            return t.untyped_storage().data_ptr()
        except Exception:
            return id(t)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def pack(self, t):
        box = _Packed(t)
        ptr = self._ptr(t)
        if self._exclude_fn is not None:
            self.exclude = {self._ptr(e) for e in self._exclude_fn() if e is not None}
        if ptr in self.exclude or ptr == 0:
            return box
        if ptr in self.live:
            self.live[ptr][1] += 1
        else:
            try:
                nbytes = t.untyped_storage().nbytes()
            except Exception:
                nbytes = t.numel() * t.element_size()
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(box, self._release, ptr)
        return box

    @staticmethod
    def unpack(box):
        return box.t

    @contextlib.contextmanager
    def track(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def saved_peak_bytes(fn: Callable[[], object], exclude=()) -> int:
    tracker = SavedTensorTracker(exclude)
    with tracker.track():
        fn()
    gc.collect()
    return tracker.peak


def device_peak_bytes(fn: Callable[[], object], device: str) -> tuple[Optional[int], str]:
    """Extra memory at the peak of one call of `fn`, and how it was measured.

    CUDA: torch.cuda.max_memory_allocated above the allocation before the call (exact, allocator level).
    CPU (Linux): the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
    above the resident set before the call: indicative only, since glibc may serve the call from memory
    it already holds, or keep pages after frees.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None, "unavailable"
    base = proc_status_kib("VmRSS")
    fn()
    peak = proc_status_kib("VmHWM")
    if base is None or peak is None:
        return None, "unavailable"
    return max(0, peak - base) * 1024, "rss_hwm_delta"


# --------------------------------------------------------------------------------------------
# Records and files

@dataclass
class Record:
    level: str                 # "layer" | "model"
    case: str                  # e.g. "vit_s.qkv" or "vit_small_patch16_224"
    batch: int
    tokens: int                # N = batch * 197 (layer level) / tokens per forward (model level)
    mode: str                  # layer: fwd|fwdbwd|frozen|infer ; model: step|infer
    dtype: str
    provider: str
    median_ms: float = math.nan
    min_ms: float = math.nan
    q1_ms: float = math.nan
    q3_ms: float = math.nan
    rounds: int = 0
    number: int = 0
    ratio_vs_baseline: float = math.nan    # time / baseline time (nn.Linear, or the reference step)
    baseline: str = ""
    speedup_vs_reference: float = math.nan  # reference time / time
    ratio_vs_baseline_min: float = math.nan     # the same two ratios from the fastest rounds
    speedup_vs_reference_min: float = math.nan
    speedup_vs_fp32: float = math.nan        # this provider's fp32 time / its time in this precision (paired)
    speedup_vs_fp32_min: float = math.nan
    speedup_vs_reference_fp32: float = math.nan  # the reference's fp32 time / this time (paired)
    speedup_vs_reference_fp32_min: float = math.nan
    items_per_s: float = math.nan           # images/s (model level)
    saved_mb: float = math.nan               # peak bytes held for backward
    peak_mb: float = math.nan                # device peak (see peak_method)
    peak_method: str = ""
    load1: float = math.nan                  # 1-min load average when the case ended (machine contention)
    gflop: float = math.nan                  # GFLOP of one call: layer level the route's nominal GEMM FLOPs
                                             # (layer_cases.nominal_flops), model level GEMM + conv (counted)
    extra: str = ""
    error: str = ""

    def row(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if math.isnan(v) else round(v, 6)
        return d


def fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v >= 1000:
        return f"{v:.0f}"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    return f"{v:.{digits}f}"


def csv_list(s: Optional[str]) -> list:
    return [v.strip() for v in (s or "").split(",") if v.strip()]


# --------------------------------------------------------------------------------------------
# Flags every script shares: device, method, output

def add_common_args(ap) -> None:
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: few rounds, small cases (checks the script, not numbers)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="max interleaved rounds per case (default 9 cpu / 15 cuda)")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--max-case-s", type=float, default=None,
                    help="stop adding rounds (past --min-rounds) after this long")
    ap.add_argument("--min-block-s", type=float, default=None, help="target length of one timed block")
    ap.add_argument("--warmup", type=int, default=2, help="calls per provider before timing (the last one calibrates)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument("--out-dir", default=None, help=f"default {RESULTS_DIR}")
    ap.add_argument("--tag", default=None, help="file name tag (default: the machine)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--plot", action="store_true", help="write a PNG (needs matplotlib)")
    ap.add_argument("--gflops", action="store_true", help="also print achieved GFLOP/s per case and provider")
    ap.add_argument("--merge", action="store_true", help="merge into the existing results file: rows of the cases "
                    "measured now replace the same cases there (a rerun of noisy cases); the rest is kept")


# Precisions that run under autocast: "bf16"/"fp16" through imse_kernels.precision.autocast (the library's policy:
# on a CPU with native bf16 but no AMX, attention stays fp32), "bf16-torch" plain torch.autocast (attention in bf16).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-torch": torch.bfloat16}
PRECISIONS = ("fp32", *AMP_DTYPES)


def amp_context(device: str, precision: str):
    """The context one call of `precision` runs in (see AMP_DTYPES); fp32: none."""
    from imse_kernels.precision import autocast

    if precision not in AMP_DTYPES:
        return contextlib.nullcontext()
    if precision.endswith("-torch"):
        return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[precision])
    return autocast(device, AMP_DTYPES[precision])


def usable_precisions(precisions: list, device: str, log=print) -> list:
    """The precisions this device runs at speed (imse_kernels.precision.check_autocast: bf16/fp16 on a CPU
    without native support are left out with the reason, never measured slowly in silence)."""
    from imse_kernels.precision import SlowAutocastError, check_autocast

    out = []
    for prec in precisions:
        try:
            check_autocast(device, AMP_DTYPES.get(prec))
            out.append(prec)
        except SlowAutocastError as exc:
            log(f"{prec} skipped: {exc}")
    return out


def add_precisions_arg(ap) -> None:
    """--precisions, shared by the layer and the model level (added once when a driver adds both levels' flags)."""
    try:
        ap.add_argument("--precisions", default=None, help="e.g. fp32,bf16: every provider in each precision, side "
                        "by side in one interleaved loop (paired ratios fp32/x and ref32/x); bf16/fp16 run under "
                        "torch.autocast with s in fp32, and are skipped with the reason on a CPU without native "
                        "support. Model level default fp32 (cpu) / fp32,bf16 (cuda); layer level: without it, "
                        "--dtypes alone applies")
    except argparse.ArgumentError:  # the other level's add_args added it already
        pass


def default(args, value, cpu, gpu, quick=None):
    """`value` if given, else the quick / cuda / cpu default."""
    if value is not None:
        return value
    if args.quick and quick is not None:
        return quick
    return gpu if args.device == "cuda" else cpu


def resolve_common(args, ap) -> None:
    """Fill the method defaults (after any preset of the calling script has set its own)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    args.rounds = default(args, args.rounds, 9, 15, 2)
    args.min_rounds = min(args.min_rounds, args.rounds) if not args.quick else min(2, args.rounds)
    args.max_case_s = default(args, args.max_case_s, 8.0, 3.0, 0.5)
    args.min_block_s = default(args, args.min_block_s, 0.05, 0.02, 0.005)
    if args.quick:
        args.warmup = min(args.warmup, 1)
        # one thread: an OpenMP team on oversubscribed shared cores stalls at every barrier
        args.threads = args.threads or (1 if args.device != "cuda" else None)
