"""Lower every kernel configuration to a cubin for sm_80 and sm_90 without a GPU.

`triton.compile` with a `GPUTarget` runs the whole pipeline (TTIR → TTGIR → LLVM → PTX → ptxas),
so type errors, shape errors and configurations that overflow shared memory surface on a CPU-only
machine, where the interpreter (which checks none of that) runs the numerics.
Run `TRITON_INTERPRET=0 python tools/triton_compile_check.py [--full]` for a table of all jobs.
It needs a process in which triton was imported without the interpreter: under
TRITON_INTERPRET=1 the `tl.*` helpers that are themselves jit functions become interpreted too.
"""
import sys
import time
from typing import Optional
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from imse_kernels.triton_kernels import runtime, tuning
from imse_kernels.triton_kernels.chain import chain_kernel
from imse_kernels.triton_kernels.recomposed_ds import recomposed_ds_kernel
from imse_kernels.triton_kernels.scaled_matmul import scaled_matmul_kernel

# Shared memory a block may use (bytes): sm_80 (A100) and sm_90 (H100/H200) opt-in maxima.
SHARED_LIMIT = {80: 166912, 90: 232448}

# Per kernel: (pointer args, int args, flag constexprs) in declaration order.
_KERNELS = {
    "chain": (chain_kernel,
              ["a_ptr", "b1_ptr", "s_ptr", "b2_ptr", "bias_ptr", "out_ptr", "h_ptr", "hout_ptr", "ds_ptr", "idx_ptr"],
              ["HAS_BIAS", "DS", "SAVE_H", "INDEXED"]),
    "scaled_matmul": (scaled_matmul_kernel,
                      ["a_ptr", "b_ptr", "s_ptr", "bias_ptr", "c_ptr", "h_ptr", "ds_ptr"],
                      ["SCALE_K", "SCALE_N", "HAS_BIAS", "DS", "WRITE_C"]),
    "recomposed_ds": (recomposed_ds_kernel, ["u_ptr", "g_ptr", "vh_ptr", "part_ptr"], []),
}
# Pointers that hold float32 whatever the operand dtype (s, partial sums).
_F32_PTRS = {"s_ptr", "ds_ptr", "part_ptr"}


@dataclass(frozen=True)
class Job:
    kernel: str
    capability: int
    dtype: str  # "bf16", "fp16", "fp32"
    precision: str  # "ieee" or "tf32"
    cfg: tuning.Config
    flags: tuple  # ((flag, value), ...)

    def __str__(self):
        on = ",".join(k for k, v in self.flags if v) or "none"
        return f"{self.kernel} sm_{self.capability} {self.dtype}/{self.precision} {self.cfg.name} [{on}]"


def _jit(fn) -> JITFunction:
    if not isinstance(fn, JITFunction):
        raise RuntimeError("triton_compile_check: triton was imported with TRITON_INTERPRET=1; run it in a process "
                           "started with TRITON_INTERPRET=0")
    return fn


def lower(job: Job):
    """Compile one job to a cubin; returns triton's CompiledKernel (raises on any error)."""
    fn, ptrs, flag_names = _KERNELS[job.kernel]
    jit = _jit(fn)
    flags = dict(job.flags)
    constexprs = {**flags, "CAST_F32": False, "PRECISION": job.precision, **job.cfg.kwargs}
    if "INDEXED" in flags:
        constexprs["CODES_P2"] = 16
    signature = {}
    for name in jit.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "idx_ptr":
            signature[name] = "*i64"
        elif name in ptrs:
            signature[name] = "*fp32" if name in _F32_PTRS else f"*{job.dtype}"
        else:
            signature[name] = "i32"
    src = triton.compiler.ASTSource(jit, signature, constexprs=constexprs)
    options = {"num_warps": job.cfg.num_warps, "num_stages": job.cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", job.capability, 32), options=options)


def jobs(full: bool = False) -> list[Job]:
    """Every candidate configuration in bf16 with all epilogues on; the mid-size default in fp32
    (ieee on both archs, tf32 on sm_90) and with no epilogue. `full` adds every candidate in fp16
    and fp32 (what the tuner may pick on a GPU)."""
    out = []
    for kernel, (_, _, flag_names) in _KERNELS.items():
        all_on = tuple((f, f != "INDEXED") for f in flag_names)  # the per-sample-code jobs follow
        bare = tuple((f, f == "WRITE_C") for f in flag_names)
        for cap in (80, 90):
            table = tuning.candidates(kernel, cap)
            table32 = tuning.candidates(kernel, cap, fp32=True)
            out += [Job(kernel, cap, "bf16", "ieee", cfg, all_on) for cfg in table]
            out.append(Job(kernel, cap, "fp32", "ieee", table32[1], all_on))
            if cap == 90:
                out.append(Job(kernel, cap, "fp32", "tf32", table32[1], all_on))
                out.append(Job(kernel, cap, "bf16", "ieee", table[1], bare))
            if "INDEXED" in flag_names:
                coded = tuple((f, True) for f in flag_names)
                out += [Job(kernel, cap, "bf16", "ieee", cfg, coded) for cfg in table]
                out.append(Job(kernel, cap, "fp32", "ieee", table32[1], coded))
            if full:
                out += [Job(kernel, cap, "fp16", "ieee", cfg, all_on) for cfg in table]
                out += [Job(kernel, cap, "fp32", "ieee", cfg, all_on) for cfg in table32]
    return out


def main(argv: Optional[list] = None) -> int:
    """Compile every job, print one line each; exit status 1 if any failed or overflowed."""
    args = sys.argv[1:] if argv is None else argv
    if runtime.INTERPRETED:
        print("triton_compile_check: set TRITON_INTERPRET=0 (triton was imported in interpreter mode)")
        return 2
    if "--list" in args:
        print("\n".join(map(str, jobs(full="--full" in args))))
        return 0
    failures = 0
    for job in jobs(full="--full" in args):
        t = time.time()
        try:
            k = lower(job)
            shared = k.metadata.shared
            ok = shared <= SHARED_LIMIT[job.capability]
            print(f"{'ok ' if ok else 'BIG'} {job}  shared={shared}  {time.time() - t:.1f}s")
            failures += not ok
        except Exception as exc:  # report every failing job, not just the first
            failures += 1
            print(f"ERR {job}: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
