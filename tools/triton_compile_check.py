"""Lower the Triton kernels as the JIT will, for sm_80 and sm_90, without a GPU, and check their resources.

The JIT compiles one specialisation per launch signature: the dtype of each pointer, whether each
pointer is 16-byte aligned and each int divisible by 16, ints equal to 1 folded into constants, ints
beyond the i32 range typed i64, plus the constexprs and launch options. This check builds those
signatures from the launchers themselves: it calls the triton backend's primitives (and the launchers
behind them) on CPU tensors with the kernels swapped for recorders, so each launch's real arguments
are captured, then runs triton's own binder (`create_function_from_signature`, the JIT's `_pack_args`)
on them for a `GPUTarget` and lowers the result with `triton.compile` (TTIR -> TTGIR -> LLVM -> PTX ->
ptxas). Nothing runs on a device; the interpreter (which checks no types, layouts or resources) runs
the numerics elsewhere.

Per unique specialisation it records compile seconds (a private, empty triton cache unless
--cache-dir), shared memory (the kernel's metadata), and registers and spills from
`cuobjdump -res-usage` on the cubin (the cuobjdump that the triton package carries; spill bytes are the
per-thread STACK + LOCAL frame, which in these kernels holds nothing but spilled registers). A job
fails when it does not lower, its shared memory exceeds the architecture's opt-in maximum, it needs
more than 255 registers, or it spills more than SPILL_LIMIT bytes per thread. The failure counts unless the
configuration is one `tuning.DROPPED` already removes from the tuner (lowered here as evidence, marked
`dropped`) or a `CODES_P2` the launcher never uses (marked `unreachable`).

Job sets (--tiers, default all):
  defaults    every primitive and variant with its default tile, for every shape class, dtype and arch;
  candidates  every tuner candidate on the vit and odd shape classes, and every dropped one (also those of a
              kernel that DROPPED left without tiles, which the backend no longer offers);
  codes       the per-sample-codes chain at CODES_P2 in {16, 64, 256} (256 is unreachable: K > 64 runs
              on the segmented ATen path), default tile.
Shape classes (only the specialisation matters, so the row count stands for any with its
divisibility): vit (ViT-B fc1, 768 -> 3072, r 768, a row count divisible by 16 as 197 x 16 is),
vit_b1 (the same layer at 197 rows), odd (45 -> 29, r 23, 37 rows, x starting one element into its
storage: misaligned), n1 (one row).

    TRITON_INTERPRET=0 python tools/triton_compile_check.py [--tiers defaults,codes] [--arch 90]
        [--dtypes bf16,fp32] [--shapes vit,odd] [--jobs 4] [--budget-s 300] [--csv out.csv] [--list]
        [--extra-config chain:fp32:BLOCK_M=128,BLOCK_N=256,BLOCK_R=64,BLOCK_K=32,GROUP_M=8,w4,s3]

Exit status: 0 when every counted job passed, 1 when one failed, 2 on a usage error, 3 when
--budget-s stopped it before every job ran. It needs a process in which triton was imported without
the interpreter (TRITON_INTERPRET=0).
"""
import argparse
import contextlib
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction

from imse_kernels.backends.triton_backend import TritonBackend
from imse_kernels.triton_kernels import chain as chain_module
from imse_kernels.triton_kernels import recomposed_ds as recomposed_ds_module
from imse_kernels.triton_kernels import runtime, tuning
from imse_kernels.triton_kernels import scaled_matmul as scaled_matmul_module

try:  # the JIT's own binder (triton 3.x); without it this check cannot promise what it promises
    from triton.runtime.jit import create_function_from_signature
except ImportError as exc:  # pragma: no cover - a triton that reorganised its JIT
    raise SystemExit(f"triton_compile_check: this triton ({triton.__version__}) has no "
                     f"create_function_from_signature ({exc}); update the check to its JIT") from exc

# Per-block limits: shared memory (opt-in maximum, bytes) of sm_80 (A100) and sm_90 (H100/H200);
# registers per thread on both.
SHARED_LIMIT = {80: 166912, 90: 232448}
MAX_REGISTERS = 255
# Spill bytes per thread a job may have and pass: 16 four-byte registers. ptxas spills a register or
# two in one specialisation and not in its neighbour (8-24 bytes come and go with the alignment of one
# pointer); the spills that cost are hundreds of bytes to kilobytes. A passing job that spills is
# marked "ok~" in the table.
SPILL_LIMIT = 64
ARCHS = (80, 90)

KERNEL_MODULES = {"chain": (chain_module, "chain_kernel"),
                  "scaled_matmul": (scaled_matmul_module, "scaled_matmul_kernel"),
                  "recomposed_ds": (recomposed_ds_module, "recomposed_ds_kernel")}
CODES_P2_CHECKED = (16, 64, 256)

# name -> (rows, d_in, d_out, r, x misaligned, runtime.aligned of the problem)
SHAPE_CLASSES = {"vit": (32, 768, 3072, 768, False, True), "vit_b1": (197, 768, 3072, 768, False, True),
                 "odd": (37, 45, 29, 23, True, False), "n1": (1, 768, 3072, 768, False, True)}
# dtype name -> (torch dtype, tl.dot precision for fp32 operands)
DTYPES = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "fp32": (torch.float32, "ieee"),
          "tf32": (torch.float32, "tf32")}


# ------------------------------------------------------------------------------------------------
# Capturing the launches

@dataclass
class Launch:
    kernel: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` records, runs nothing."""

    def __init__(self, kernel: str, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, dict(kwargs)))


class _Offered(Exception):
    """Stops a primitive once the tuner has been offered its candidates."""


@contextlib.contextmanager
def capturing(capability: int, precision: str, choice: dict):
    """Inside: CPU tensors are accepted as if on a GPU of `capability`, fp32 dots use `precision`,
    kernels record instead of launching, and the tuner returns choice["name"] (recording what it
    was offered in choice["offered"], choice["default"])."""
    sink: list[Launch] = []
    saved = [(runtime, n, getattr(runtime, n)) for n in ("supports", "capability", "dot_precision", "cast_f32")]
    saved += [(mod, attr, getattr(mod, attr)) for mod, attr in KERNEL_MODULES.values()]
    saved.append((tuning, "choose", tuning.choose))

    def choose(key, device, candidates, default):
        choice["offered"], choice["default"] = list(candidates), default
        if choice.get("name") not in candidates:
            raise _Offered()  # the question was what is offered: run nothing
        return choice["name"]

    try:
        runtime.supports = lambda device: True
        runtime.capability = lambda device: capability
        runtime.dot_precision = lambda dtype: precision if dtype == torch.float32 else "ieee"
        runtime.cast_f32 = lambda dtype: False
        for kernel, (mod, attr) in KERNEL_MODULES.items():
            setattr(mod, attr, _Recorder(kernel, sink))
        tuning.choose = choose
        yield sink
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _inputs(shape: str, dtype: torch.dtype, codes: int):
    rows, d_in, d_out, r, misaligned, _ = SHAPE_CLASSES[shape]
    g = torch.Generator().manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=g).to(dtype)

    x = rnd(rows * d_in + 1)[1:].view(rows, d_in) if misaligned else rnd(rows, d_in)
    U, Vh, bias, grad = rnd(d_out, r), rnd(r, d_in), rnd(d_out), rnd(rows, d_out)
    s = torch.rand(r, generator=g) + 0.5
    S = torch.rand(codes, r, generator=g) + 0.5
    index = torch.arange(rows) % codes
    h = rnd(rows, r)
    W = rnd(d_out, d_in)
    return x, U, s, Vh, bias, grad, S, index, h, W


def _patterns(b: TritonBackend, shape: str, dtype: torch.dtype, codes: int) -> dict:
    """The backend's primitives, one zero-argument call per argument pattern."""
    x, U, s, Vh, bias, grad, S, index, h, W = _inputs(shape, dtype, codes)
    return {
        "fwd": lambda: b.factorized_forward(x, U, s, Vh, bias, False),
        "fwd_h": lambda: b.factorized_forward(x, U, s, Vh, bias, True),
        "fwd_nobias": lambda: b.factorized_forward(x, U, s, Vh, None, False),
        "recompose": lambda: b.recompose(U, s, Vh),
        "bwd": lambda: b.factorized_backward(grad, h, U, s, Vh, True),
        "bwd_ds": lambda: b.factorized_backward(grad, h, U, s, Vh, False),
        "dx": lambda: b.factorized_input_grad(grad, U, s, Vh),
        "bwd_R": lambda: b.recomposed_backward(grad, x, U, s, Vh, W, True),
        "fwd_codes": lambda: b.indexed_forward(x, U, S, Vh, bias, index, True),
        "bwd_codes": lambda: b.indexed_backward(grad, h, U, S, Vh, index, True),
        "dx_codes": lambda: b.indexed_input_grad(grad, U, S, Vh, index),
    }


CODED_PATTERNS = ("fwd_codes", "bwd_codes", "dx_codes")


@dataclass
class Job:
    kernel: str
    capability: int
    dtype: str
    config: str
    codes_p2: Optional[int]
    flags: str
    launch: Launch
    uses: set = field(default_factory=set)  # "pattern@shape" that lower to this same specialisation
    status_note: str = ""  # "dropped" or "unreachable": lowered, but a failure does not count
    result: dict = field(default_factory=dict)

    def label(self) -> str:
        codes = f" CODES_P2={self.codes_p2}" if self.codes_p2 else ""
        return f"{self.kernel} sm_{self.capability} {self.dtype} {self.config}{codes} [{self.flags}]"


_FLAG_NAMES = ("HAS_BIAS", "DS", "SAVE_H", "INDEXED", "SCALE_K", "SCALE_N", "WRITE_C")


def _config_name(launch: Launch) -> str:
    meta = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK_") or k == "GROUP_M"}
    return tuning.make(launch.kwargs["num_warps"], launch.kwargs["num_stages"], **meta).name


def _specialise(launch: Launch, capability: int):
    """(options, signature, constexprs, attrs) exactly as the JIT derives them for this launch."""
    jit = _jit(_KERNEL_FUNCTIONS[launch.kernel])
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = jit.debug or _knob_debug()
    if _instrumentation_mode() is not None:
        kwargs["instrumentation_mode"] = _instrumentation_mode()
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return jit._pack_args(backend, kwargs, bound_args, specialization, options)


def _knob_debug() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs and knobs.runtime.debug)


def _instrumentation_mode():
    knobs = getattr(triton, "knobs", None)
    return getattr(knobs.compilation, "instrumentation_mode", None) if knobs else None


_KERNEL_FUNCTIONS = {k: getattr(mod, attr) for k, (mod, attr) in KERNEL_MODULES.items()}


def _jit(fn) -> JITFunction:
    if not isinstance(fn, JITFunction):
        raise SystemExit("triton_compile_check: triton was imported with TRITON_INTERPRET=1; run it in a process "
                         "started with TRITON_INTERPRET=0")
    return fn


def _key(launch: Launch, capability: int) -> str:
    options, signature, constexprs, attrs = _specialise(launch, capability)
    return repr((launch.kernel, capability, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))


def collect(tiers: set, archs, dtypes, shapes, extra: list) -> list[Job]:
    """The unique specialisations of the chosen tiers, in a fixed order."""
    jobs: dict[str, Job] = {}
    backend = TritonBackend()

    def add(launch: Launch, cap: int, dtype: str, use: str, note: str = "") -> None:
        key = _key(launch, cap)
        if key not in jobs:
            flags = ",".join(f for f in _FLAG_NAMES if launch.kwargs.get(f)) or "none"
            jobs[key] = Job(launch.kernel, cap, dtype, _config_name(launch),
                            launch.kwargs.get("CODES_P2") if launch.kwargs.get("INDEXED") else None, flags, launch,
                            status_note=note)
        elif not note:  # a specialisation some use still launches counts, whatever else lowered it as evidence
            jobs[key].status_note = ""
        jobs[key].uses.add(use)

    for cap in archs:
        for dtype in dtypes:
            torch_dtype, precision = DTYPES[dtype]
            fp32 = torch_dtype == torch.float32
            for shape in shapes if "defaults" in tiers else ():
                for pattern, call in _patterns(backend, shape, torch_dtype, 5).items():
                    for launch, _ in _launches(call, cap, precision, default_only=True, fp32=fp32,
                                               aligned=SHAPE_CLASSES[shape][5]):
                        add(launch, cap, dtype, f"{pattern}@{shape}")
            for shape in [s for s in ("vit", "odd") if s in shapes] if "candidates" in tiers else ():
                # the coded launches at both reachable CODES_P2, 16 and 64
                calls = list(_patterns(backend, shape, torch_dtype, 5).items())
                calls += [(p, c) for p, c in _patterns(backend, shape, torch_dtype, 61).items() if p in CODED_PATTERNS]
                for pattern, call in calls:
                    for launch, dropped in _launches(call, cap, precision, default_only=False, fp32=fp32,
                                                     codes=pattern in CODED_PATTERNS,
                                                     aligned=SHAPE_CLASSES[shape][5]):
                        add(launch, cap, dtype, f"{pattern}@{shape}", "dropped" if dropped else "")
            if "codes" in tiers:
                for codes_p2 in CODES_P2_CHECKED:
                    for shape in [s for s in ("vit", "odd") if s in shapes]:
                        codes = min(codes_p2, 64) - 3  # a K that rounds up to codes_p2 (256: see below)
                        pats = _patterns(backend, shape, torch_dtype, codes)
                        for pattern in CODED_PATTERNS:
                            for launch, _ in _launches(pats[pattern], cap, precision, default_only=True, fp32=fp32,
                                                       aligned=SHAPE_CLASSES[shape][5]):
                                if codes_p2 > 64:  # the launcher sends K > 64 to ATen: lowered as evidence only
                                    launch = _with_codes(launch, codes_p2)
                                add(launch, cap, dtype, f"{pattern}@{shape}",
                                    "unreachable" if codes_p2 > 64 else "")
            for kernel, cfg, dtype_x in extra:
                if dtype_x == dtype:
                    for shape in shapes:
                        for launch in _extra_launches(backend, kernel, cfg, cap, shape, torch_dtype, precision):
                            add(launch, cap, dtype, f"extra@{shape}")
    return list(jobs.values())


def _with_codes(launch: Launch, codes_p2: int) -> Launch:
    names = _KERNEL_FUNCTIONS["chain"].arg_names
    args = list(launch.args)
    args[names.index("NUM_CODES")] = codes_p2 - 3
    return Launch(launch.kernel, tuple(args), dict(launch.kwargs, CODES_P2=codes_p2))


def _launches(call, cap: int, precision: str, default_only: bool, fp32: bool, codes: bool = False,
              aligned: bool = True):
    """[(launch, dropped)] of every kernel candidate the primitive offers the tuner (or only the
    defaults of each variant), each captured from a real call of the primitive."""
    choice: dict = {"name": None}
    with capturing(cap, precision, choice), contextlib.suppress(_Offered):
        call()  # records the offered candidates and the default, then stops
    offered = [n for n in choice.get("offered", []) if n != "blas"]
    out = []
    for name in offered:
        choice["name"] = name
        with capturing(cap, precision, choice) as sink:
            call()
        for launch in sink:
            m = launch.args[_KERNEL_FUNCTIONS[launch.kernel].arg_names.index(_ROWS_ARG[launch.kernel])]
            coded = bool(launch.kwargs.get("INDEXED"))
            default = tuning.default(launch.kernel, cap, m, fp32, precision, coded, aligned).name
            config = _config_name(launch)
            dropped = config in tuning.dropped(launch.kernel, cap, fp32, precision, coded, aligned)
            if not default_only or config == default:
                out.append((launch, dropped))
    if default_only:  # the dropped configurations are not candidates, so they never show here
        return out
    # The dropped configurations, as evidence: offered again with nothing dropped (so those of a kernel
    # left without tiles, which the backend no longer offers, are lowered too), each chosen by its name.
    evidence = [(kernel, cfg) for kernel in KERNEL_MODULES
                for cfg in tuning.dropped_configs(kernel, cap, fp32, precision, codes, aligned)]
    with _nothing_dropped():
        everything: dict = {"name": None}
        with capturing(cap, precision, everything), contextlib.suppress(_Offered):
            call()
        for kernel, cfg in evidence:
            for name in [n for n in everything.get("offered", []) if n.endswith("/" + cfg.name)]:
                choice["name"] = name
                with capturing(cap, precision, choice) as sink:
                    call()
                out += [(lch, True) for lch in sink if lch.kernel == kernel and _config_name(lch) == cfg.name]
    return out


@contextlib.contextmanager
def _nothing_dropped():
    """Inside: `tuning.DROPPED` is empty, so the backend offers every configuration of its tables."""
    saved = tuning.DROPPED
    tuning.DROPPED = {}
    try:
        yield
    finally:
        tuning.DROPPED = saved


_ROWS_ARG = {"chain": "M", "scaled_matmul": "M", "recomposed_ds": "R"}


@contextlib.contextmanager
def _only_config(kernel: str, cfg: tuning.Config):
    """The launchers of `kernel` get `cfg` whatever they were given (for configurations no longer offered)."""
    mod = KERNEL_MODULES[kernel][0]
    launcher_name = {"chain": "chain", "scaled_matmul": "scaled_matmul", "recomposed_ds": "recomposed_ds"}[kernel]
    real = getattr(mod, launcher_name)

    def forced(*args, **kwargs):
        kwargs["cfg"] = cfg
        return real(*args, **kwargs)

    users = [m for m in sys.modules.values() if m is not None and getattr(m, launcher_name, None) is real]
    for m in users:
        setattr(m, launcher_name, forced)
    try:
        yield
    finally:
        for m in users:
            setattr(m, launcher_name, real)


def _extra_launches(backend, kernel: str, cfg: tuning.Config, cap: int, shape: str, dtype, precision: str):
    """Launches of `kernel` with a configuration given on the command line (the check must be able to fail)."""
    patterns = {"chain": ("fwd_h", "bwd", "bwd_codes"), "scaled_matmul": ("fwd", "bwd"),
                "recomposed_ds": ("bwd_R",)}[kernel]
    pats = _patterns(backend, shape, dtype, 5)
    out = []
    for pattern in patterns:
        choice = {"name": None}
        with capturing(cap, precision, choice), contextlib.suppress(_Offered):
            pats[pattern]()
        for name in choice.get("offered", []):
            if name == "blas":
                continue
            choice["name"] = name
            with capturing(cap, precision, choice) as sink, _only_config(kernel, cfg):
                pats[pattern]()
            found = [lch for lch in sink if lch.kernel == kernel]
            if found:
                out += found
                break
    return out


def parse_extra(text: str) -> tuple[str, tuning.Config, str]:
    """kernel:dtype:BLOCK_M=..,...,wN,sN -> (kernel, Config, dtype)."""
    try:
        kernel, dtype, spec = text.split(":", 2)
        meta, warps, stages = {}, 4, 3
        for item in spec.split(","):
            if "=" in item:
                k, v = item.split("=")
                meta[k] = int(v)
            elif item.startswith("w"):
                warps = int(item[1:])
            elif item.startswith("s"):
                stages = int(item[1:])
        if kernel not in KERNEL_MODULES or dtype not in DTYPES:
            raise ValueError
        return kernel, tuning.make(warps, stages, **meta), dtype
    except ValueError:
        raise SystemExit(f"triton_compile_check: --extra-config {text!r}: expected kernel:dtype:BLOCK_X=n,...,wN,sN "
                         f"with kernel in {list(KERNEL_MODULES)} and dtype in {list(DTYPES)}") from None


# ------------------------------------------------------------------------------------------------
# Lowering and resources

def cuobjdump() -> Optional[str]:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for path in (here, shutil.which("cuobjdump")):
        if path and os.path.exists(path):
            return path
    return None


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local bytes per thread of the one kernel in `cubin` (cuobjdump -res-usage)."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (triton's backends/nvidia/bin or PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=120)
    m = _RES.search(out.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line: {out.stdout[-500:]} {out.stderr[-500:]}")
    regs, stack, _, local = map(int, m.groups())
    return {"registers": regs, "spill_bytes": stack + local}


def lower(job: Job) -> dict:
    """Compile one job to a cubin; its compile seconds, shared memory, registers, spills and verdict."""
    t0 = time.perf_counter()
    try:
        options, signature, constexprs, attrs = _specialise(job.launch, job.capability)
        src = ASTSource(_KERNEL_FUNCTIONS[job.kernel], signature, constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job.capability, 32), options=options.__dict__)
        seconds = time.perf_counter() - t0
        res = resource_usage(kernel.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - every failing job is reported, not only the first
        return {"status": "ERR", "seconds": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"[:400]}
    shared = int(kernel.metadata.shared)
    problems = []
    if shared > SHARED_LIMIT[job.capability]:
        problems.append(f"shared {shared} > {SHARED_LIMIT[job.capability]}")
    if res["registers"] > MAX_REGISTERS:
        problems.append(f"registers {res['registers']} > {MAX_REGISTERS}")
    if res["spill_bytes"] > SPILL_LIMIT:
        problems.append(f"spills {res['spill_bytes']} bytes per thread (more than {SPILL_LIMIT})")
    status = ("ok" if res["spill_bytes"] == 0 else "ok~") if not problems else (
        "BIG" if shared > SHARED_LIMIT[job.capability] else "SPILL" if res["spill_bytes"] > SPILL_LIMIT else "REGS")
    return {"status": status, "seconds": seconds, "shared": shared, **res, "problems": "; ".join(problems)}


def _passed(job: Job) -> bool:
    return job.result.get("status") in ("ok", "ok~")


def counts(job: Job) -> bool:
    """Whether a failure of this job fails the check (dropped and unreachable ones are evidence only)."""
    return not job.status_note


COLUMNS = ("status", "kernel", "arch", "dtype", "config", "codes_p2", "flags", "compile_s", "shared_kb", "registers",
           "spill_bytes", "note", "uses", "problems")


def row(job: Job) -> dict:
    r = job.result
    return {"status": r.get("status", "-"), "kernel": job.kernel, "arch": f"sm_{job.capability}", "dtype": job.dtype,
            "config": job.config, "codes_p2": job.codes_p2 or "", "flags": job.flags,
            "compile_s": f"{r['seconds']:.1f}" if "seconds" in r else "",
            "shared_kb": f"{r['shared'] / 1024:.1f}" if "shared" in r else "",
            "registers": r.get("registers", ""), "spill_bytes": r.get("spill_bytes", ""), "note": job.status_note,
            "uses": " ".join(sorted(job.uses)), "problems": r.get("problems") or r.get("error", "")}


def _line(job: Job) -> str:
    r = row(job)
    return (f"{r['status']:<5} {job.label()}  compile={r['compile_s']}s shared={r['shared_kb']}KB "
            f"regs={r['registers']} spill={r['spill_bytes']}B{' (' + job.status_note + ')' if job.status_note else ''}"
            f"  uses={r['uses']}{'  ' + r['problems'] if r['problems'] else ''}")


def _run_one(index: int) -> dict:
    return lower(_JOBS[index])


_JOBS: list[Job] = []


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiers", default="defaults,candidates,codes")
    ap.add_argument("--arch", default="80,90", help="comma list of 80, 90")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32,tf32")
    ap.add_argument("--shapes", default=",".join(SHAPE_CLASSES))
    ap.add_argument("--extra-config", action="append", default=[], help="kernel:dtype:BLOCK_M=..,..,wN,sN (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes (forked)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no job after this many seconds")
    ap.add_argument("--cache-dir", default=None, help="triton cache (default: a private, empty one, so the "
                    "compile times are real; the JIT's own cache to warm it)")
    ap.add_argument("--csv", default=None, help="also write the table here, one row per job as it ends")
    ap.add_argument("--table", default=None, help="at the end, write an aligned text table and the summary here")
    ap.add_argument("--list", action="store_true", help="list the jobs, lower nothing")
    ap.add_argument("--drops-from", nargs="+", metavar="CSV", help="print the tuning.DROPPED entries that these "
                    "tables' counted failures call for (with those already dropped), lower nothing")
    args = ap.parse_args(argv)
    if args.drops_from:
        print(drops_from(args.drops_from))
        return 0
    if runtime.INTERPRETED:
        print("triton_compile_check: set TRITON_INTERPRET=0 (triton was imported in interpreter mode)")
        return 2
    tiers = {t for t in args.tiers.split(",") if t}
    archs = [int(a) for a in args.arch.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    shapes = [s for s in args.shapes.split(",") if s]
    bad = (tiers - {"defaults", "candidates", "codes", "none"}) or (set(archs) - set(ARCHS)) or \
        (set(dtypes) - set(DTYPES)) or (set(shapes) - set(SHAPE_CLASSES))
    if bad:
        print(f"triton_compile_check: unknown {sorted(map(str, bad))}", file=sys.stderr)
        return 2
    extra = [parse_extra(e) for e in args.extra_config]

    t_collect = time.perf_counter()
    _JOBS[:] = collect(tiers, archs, dtypes, shapes, extra)
    header = (f"# triton {triton.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}; "
              f"{len(_JOBS)} unique specialisations from tiers {sorted(tiers)}, arch {archs}, dtypes {dtypes}, "
              f"shapes {shapes} (captured in {time.perf_counter() - t_collect:.1f}s); spill limit {SPILL_LIMIT} B; "
              f"cuobjdump {cuobjdump()}")
    print(header, flush=True)
    if args.list:
        print("\n".join(j.label() + "  uses=" + " ".join(sorted(j.uses)) for j in _JOBS))
        return 0

    cache = args.cache_dir or tempfile.mkdtemp(prefix="imse_compile_check_")
    os.environ["TRITON_CACHE_DIR"] = cache
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "cache"):
        knobs.cache.dir = cache
    t0 = time.perf_counter()
    writer = None
    csv_file = open(args.csv, "w", newline="") if args.csv else None
    if csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=COLUMNS)
        writer.writeheader()
    try:
        for i, res in _execute(args.jobs, args.budget_s, t0):  # each line written as its job ends
            job = _JOBS[i]
            job.result = res
            print(_line(job), flush=True)
            if writer:
                writer.writerow(row(job))
                csv_file.flush()
    finally:
        if csv_file:
            csv_file.close()
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    failed = [j for j in _JOBS if j.result and not _passed(j) and counts(j)]
    evidence = [j for j in _JOBS if j.result and not _passed(j) and not counts(j)]
    ran = [j for j in _JOBS if j.result]
    truncated = len(ran) < len(_JOBS)
    print(f"# {len(ran)}/{len(_JOBS)} lowered in {time.perf_counter() - t0:.0f}s: {len(failed)} failed, "
          f"{len(evidence)} failing but dropped or unreachable"
          f"{', truncated at --budget-s' if truncated else ''}")
    for j in failed:
        print(f"# FAILED {j.label()}: {j.result.get('problems') or j.result.get('error')}")
    for j in evidence:
        print(f"# {j.status_note.upper()} {j.label()}: {j.result.get('problems') or j.result.get('error')}")
    if args.table:
        write_table(args.table, ran, failed, evidence, header)
    return 1 if failed else (3 if truncated else 0)


def drops_from(paths: list) -> str:
    """tuning.DROPPED as Python source: its entries plus every configuration that failed in these tables."""
    operand_class = {"bf16": "16bit", "fp16": "16bit", "fp32": "fp32", "tf32": "tf32"}
    drops = {k: set(v) for k, v in tuning.DROPPED.items()}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["status"] in ("ok", "ok~") or r["note"] == "unreachable":
                    continue
                key = (r["kernel"], int(r["arch"][3:]), operand_class[r["dtype"]],
                       "codes" if "INDEXED" in r["flags"] else "plain",
                       "unaligned" if any(u.endswith("@odd") for u in r["uses"].split()) else "aligned")
                drops.setdefault(key, set()).add(r["config"])
    lines = ["DROPPED: dict[tuple[str, int, str, str, str], frozenset[str]] = {"]
    for key in sorted(drops):
        lines.append(f"    {key!r}: frozenset({{")
        names = [f'"{n}"' for n in sorted(drops[key])]
        for i in range(0, len(names), 3):
            lines.append("        " + ", ".join(names[i:i + 3]) + ",")
        lines.append("    }),")
    return "\n".join(lines + ["}"])


TABLE = (("status", 6), ("kernel", 14), ("arch", 6), ("dtype", 5), ("config", 32), ("codes_p2", 8), ("flags", 27),
         ("compile_s", 9), ("shared_kb", 9), ("registers", 9), ("spill_bytes", 11), ("note", 11))


def write_table(path: str, ran: list, failed: list, evidence: list, header: str) -> None:
    """An aligned table of every job lowered, then the failures and the configurations lowered as evidence."""
    lines = [header, "", "  ".join(name.ljust(width) for name, width in TABLE)]
    for job in ran:
        r = row(job)
        lines.append("  ".join(str(r[name]).ljust(width) for name, width in TABLE).rstrip())
    lines += ["", f"{len(ran)} jobs; {len(failed)} counted failures; {len(evidence)} failing, dropped or unreachable "
                  f"(lowered as evidence, not counted):"]
    lines += [f"  FAILED {j.label()}: {j.result.get('problems') or j.result.get('error')}" for j in failed]
    lines += [f"  {j.status_note} {j.label()}: {j.result.get('problems') or j.result.get('error')}" for j in evidence]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _execute(n_procs: int, budget_s: Optional[float], t0: float):
    """(index, result) of each job as it ends; no job starts after budget_s."""
    def within_budget() -> bool:
        return budget_s is None or time.perf_counter() - t0 <= budget_s

    if n_procs <= 1:
        for i, job in enumerate(_JOBS):
            if not within_budget():
                return
            yield i, lower(job)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(n_procs, mp_context=multiprocessing.get_context("fork")) as pool:
        todo = iter(range(len(_JOBS)))
        running = {}
        while True:
            while len(running) < n_procs and within_budget():
                i = next(todo, None)
                if i is None:
                    break
                running[pool.submit(_run_one, i)] = i
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                try:
                    yield i, fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died: that job's error
                    yield i, {"status": "ERR", "seconds": 0.0, "error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    raise SystemExit(main())
