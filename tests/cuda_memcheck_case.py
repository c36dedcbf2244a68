"""Reference checks of the CUDA backend's primitives (the `imse_ext` ops of csrc/cuda).

Imported by tests/gpu/test_cuda_build.py (kernels run by the host emulator, ops `torch.ops.imse_emu`
on CPU tensors) and tests/gpu/test_cuda_gpu.py (`torch.ops.imse_ext` on CUDA tensors), which also share
its checks of the per-sample-code (`indexed_*`) ops. Run as a script it is the small case for the
sanitizers:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/cuda_memcheck_case.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda_memcheck_case.py --quick
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) python tests/cuda_memcheck_case.py --emu-build NAME --asan

It walks every primitive, every dtype, TF32 on and off, with the custom kernels on (IMSE_CUDA_FUSED=1:
fused chain, deterministic ds) and off (=0: the cuBLAS/ATen path), over shapes that are not multiples
of the tiles, and checks the results too.
"""
import argparse
import contextlib
import os
import sys
from typing import Optional

import torch
from helpers import per_code_oracle

# Max error relative to max |reference|, against the float64 torch backend.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TF32_TOL = 5e-3

# (N, d_in, d_out, r): odd sizes, N = 1, truncated rank, vector-aligned sizes, several blocks.
SMALL_SHAPES = [
    (1, 8, 8, 8),
    (37, 45, 29, 21),
    (64, 64, 96, 64),
    (130, 72, 40, 24),
    (50, 40, 56, 12),
    (5, 3, 1, 2),
]


def tol_for(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOL
    return TOL[dtype]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double().to(a.device)
    assert a.shape == ref.shape, f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().clamp_min(1e-30)
    return ((a - ref).abs().max() / scale).item()


@contextlib.contextmanager
def env(**values: Optional[str]):
    """Temporarily set (or, with None, unset) environment variables read by the kernels' launcher."""
    def apply(settings):
        for k, v in settings.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(old)


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def make_inputs(n, d_in, d_out, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(n, d_in)
    U = rnd(d_out, r, scale=max(d_out, 1) ** -0.5)
    Vh = rnd(r, d_in, scale=max(d_in, 1) ** -0.5)
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = (torch.rand(r, generator=g, dtype=torch.float64) * 2 + 0.25).to(s_dtype).to(device)
    b = rnd(d_out) if bias else None
    grad = rnd(n, d_out)
    return x, U, s, Vh, b, grad


def check_primitives(ops, n, d_in, d_out, r, dtype, device, bias=True, seed=0, own_oracle=False):
    """Run the five primitives through `ops` and compare with the torch backend in float64 (and, with
    own_oracle, with the torch backend in `dtype` on the same device). Returns {output: error}."""
    from imse_kernels.backends.torch_backend import TorchBackend

    tb = TorchBackend()
    tol = tol_for(dtype)
    x, U, s, Vh, b, grad = make_inputs(n, d_in, d_out, r, dtype, device, bias, seed)
    d64 = lambda t: None if t is None else t.detach().double()  # noqa: E731  (oracle on the same device)
    x64, U64, s64, Vh64, b64, g64 = map(d64, (x, U, s, Vh, b, grad))

    y, h = ops.factorized_forward(x, U, s, Vh, b, True)
    y_fused, h_none = ops.factorized_forward(x, U, s, Vh, b, False)
    W = ops.recompose(U, s, Vh)
    dx, ds = ops.factorized_backward(grad, h, U, s, Vh, True)
    dx_none, ds_only = ops.factorized_backward(grad, h, U, s, Vh, False)
    dxi = ops.factorized_input_grad(grad, U, s, Vh)
    dxr, dsr = ops.recomposed_backward(grad, x, U, s, Vh, W, True)
    dxr_none, dsr_only = ops.recomposed_backward(grad, x, U, s, Vh, W, False)

    for t in (y, y_fused, h, W, dx, dxi, dxr):
        assert t.dtype == dtype and t.device == x.device, (t.dtype, t.device)
    for t in (ds, ds_only, dsr, dsr_only):
        assert t.dtype == s.dtype and t.shape == (r,), (t.dtype, t.shape)
    assert h.shape == (n, r) and h_none.numel() == 0 and dx_none.numel() == 0 and dxr_none.numel() == 0
    # The reductions do not depend on whether dx is also computed: same kernels, same order.
    assert torch.equal(ds, ds_only), "factorized ds changed with need_dx"
    assert torch.equal(dsr, dsr_only), "recomposed ds changed with need_dx"

    y64, h64 = tb.factorized_forward(x64, U64, s64, Vh64, b64, True)
    W64 = tb.recompose(U64, s64, Vh64)
    dx64, ds64 = tb.factorized_backward(g64, h64, U64, s64, Vh64, True)
    dxr64, dsr64 = tb.recomposed_backward(g64, x64, U64, s64, Vh64, W64, True)
    pairs = {"y": (y, y64), "y_fused": (y_fused, y64), "h": (h, h64), "W": (W, W64), "dx": (dx, dx64),
             "ds": (ds, ds64), "dx_input": (dxi, dx64), "dx_recomposed": (dxr, dxr64), "ds_recomposed": (dsr, dsr64)}
    errs = {k: rel_err(a, ref) for k, (a, ref) in pairs.items()}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{dtype} (N, d_in, d_out, r)={(n, d_in, d_out, r)} bias={bias}: errors over {tol:g}: {bad}"

    if own_oracle:  # the torch backend in the same dtype on the same device
        yo, ho = tb.factorized_forward(x, U, s, Vh, b, True)
        Wo = tb.recompose(U, s, Vh)
        dxo, dso = tb.factorized_backward(grad, ho, U, s, Vh, True)
        dxro, dsro = tb.recomposed_backward(grad, x, U, s, Vh, Wo, True)
        own = {"y": (y, yo), "W": (W, Wo), "dx": (dx, dxo), "ds": (ds, dso), "dx_recomposed": (dxr, dxro),
               "ds_recomposed": (dsr, dsro)}
        own_errs = {k: rel_err(a, ref) for k, (a, ref) in own.items()}
        bad = {k: e for k, e in own_errs.items() if not e <= 2 * tol}
        assert not bad, f"{dtype} {(n, d_in, d_out, r)}: differs from the torch backend in {dtype}: {bad}"
    return errs


def check_determinism(ops, n, d_in, d_out, r, dtype, device, repeats=3):
    """ds (both routes) is bitwise identical across runs."""
    x, U, s, Vh, b, grad = make_inputs(n, d_in, d_out, r, dtype, device, True, seed=1)
    _, h = ops.factorized_forward(x, U, s, Vh, b, True)
    W = ops.recompose(U, s, Vh)
    first = None
    for _ in range(repeats):
        _, ds = ops.factorized_backward(grad, h, U, s, Vh, True)
        _, dsr = ops.recomposed_backward(grad, x, U, s, Vh, W, True)
        if first is None:
            first = (ds.clone(), dsr.clone())
        else:
            assert torch.equal(ds, first[0]), "factorized ds differs between runs"
            assert torch.equal(dsr, first[1]), "recomposed ds differs between runs"


def sweep(ops, device, shapes, dtypes, own_oracle=False):
    """Every dtype × TF32 × custom kernels on/off over `shapes`; returns the number of cases."""
    cases = 0
    for dtype in dtypes:
        for use_tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            for fused in ("0", "1"):
                with env(IMSE_CUDA_FUSED=fused), tf32(use_tf32):
                    for i, shape in enumerate(shapes):
                        check_primitives(ops, *shape, dtype, device, bias=(i % 2 == 0), seed=i, own_oracle=own_oracle)
                        cases += 1
    return cases


# ------------------------------------------------------------------ per-sample codes (docs/design.md §8)

# (N, d_in, d_out, r, K): N = 1 (with K = 1 and with K > N), K = 1 over several 64-row chunks, K > N
# (codes no row uses), odd sizes, codes straddling chunk boundaries, r over several 32-column tiles.
INDEXED_SHAPES = [
    (1, 8, 8, 8, 1),
    (1, 5, 7, 3, 4),
    (37, 45, 29, 21, 5),
    (130, 72, 40, 24, 3),
    (300, 24, 20, 40, 1),
    (5, 3, 1, 2, 9),
    (200, 16, 12, 70, 33),
]


def make_indexed_inputs(n, d_in, d_out, r, k, dtype, device, bias=True, seed=0):
    """make_inputs plus a (K, r) code table S in s's dtype and an int64 index that uses a random
    subset of the codes (about half when K > 2: the others are used by no row)."""
    x, U, s, Vh, b, grad = make_inputs(n, d_in, d_out, r, dtype, device, bias, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    S = (torch.rand(k, r, generator=g, dtype=torch.float64) * 2 + 0.25).to(s.dtype).to(device)
    used = torch.randperm(k, generator=g)[: (k + 1) // 2 if k > 2 else k]
    index = used[torch.randint(0, used.numel(), (n,), generator=g)].to(device)
    return x, U, S, Vh, b, grad, index


def indexed_reference(x, U, S, Vh, b, grad, index):
    """Float64, one code at a time (per_code_oracle): y, h, dx and dS of the indexed ops (rows of unused
    codes: dS 0), named as run_indexed names its outputs."""
    y, h, dx, dS = per_code_oracle(x, U, S, Vh, b, grad, index)
    return {"y": y, "y_noh": y, "h": h, "dx": dx, "dx_input": dx, "dS": dS}


def run_indexed(ops, x, U, S, Vh, b, grad, index):
    """Every indexed op and flag combination; checks dtypes, shapes and that results do not depend on
    save_h / need_dx (bitwise). Returns the outputs named as in indexed_reference."""
    y, h = ops.indexed_forward(x, U, S, Vh, b, index, True)
    y_noh, h_none = ops.indexed_forward(x, U, S, Vh, b, index, False)
    dx, dS = ops.indexed_backward(grad, h, U, S, Vh, index, True)
    dx_none, dS_only = ops.indexed_backward(grad, h, U, S, Vh, index, False)
    dxi = ops.indexed_input_grad(grad, U, S, Vh, index)
    n, r = x.shape[0], U.shape[1]
    for t in (y, y_noh, h, dx, dxi):
        assert t.dtype == x.dtype and t.device == x.device, (t.dtype, t.device)
    assert y.shape == (n, U.shape[0]) and h.shape == (n, r) and dx.shape == dxi.shape == x.shape
    assert dS.dtype == S.dtype and dS.shape == S.shape, (dS.dtype, dS.shape)
    assert h_none.numel() == 0 and dx_none.numel() == 0
    assert torch.equal(y, y_noh), "indexed_forward: y changed with save_h"
    assert torch.equal(dS, dS_only), "indexed_backward: dS changed with need_dx"
    assert torch.equal(dx, dxi), "indexed_backward and indexed_input_grad disagree on dx"
    return {"y": y, "y_noh": y_noh, "h": h, "dx": dx, "dx_input": dxi, "dS": dS}


def check_indexed(ops, n, d_in, d_out, r, k, dtype, device, bias=True, seed=0):
    """The indexed ops through `ops` against the float64 per-code loop (TOL); the dS rows of codes
    no row uses are exactly zero. Returns the outputs."""
    x, U, S, Vh, b, grad, index = make_indexed_inputs(n, d_in, d_out, r, k, dtype, device, bias, seed)
    out = run_indexed(ops, x, U, S, Vh, b, grad, index)
    ref = indexed_reference(x, U, S, Vh, b, grad, index)
    tol = tol_for(dtype)
    errs = {key: rel_err(out[key], ref[key]) for key in ref}
    bad = {key: e for key, e in errs.items() if not e <= tol}
    assert not bad, f"{dtype} (N, d_in, d_out, r, K)={(n, d_in, d_out, r, k)} bias={bias}: errors over {tol:g}: {bad}"
    unused = torch.ones(k, dtype=torch.bool, device=device)
    unused[index] = False
    assert torch.equal(out["dS"][unused], torch.zeros_like(out["dS"][unused])), "dS of unused codes is not zero"
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_SOURCES = [os.path.join(ROOT, "csrc", "cuda", "emu", f) for f in ("emu_kernels.cpp", "emu_ops.cpp")]


def build_emulator(name: str, asan: bool = False) -> str:
    """Compile csrc/cuda's kernels and ops against the host emulator into build/<name>/ and load
    them (torch.ops.imse_emu). With asan, the process must have libasan preloaded."""
    import glob

    from torch.utils import cpp_extension

    build = os.path.join(ROOT, "build", name)
    os.makedirs(build, exist_ok=True)
    cflags = ["-O1" if asan else "-O2", "-g0", "-Wno-unknown-pragmas"]
    ldflags = []
    if asan:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    cpp_extension.load(name=name, sources=EMU_SOURCES, extra_cflags=cflags, extra_ldflags=ldflags,
                       build_directory=build, is_python_module=False, verbose=False)
    libs = glob.glob(os.path.join(build, f"{name}*.so"))
    assert libs, f"emulator library {name} not found in {build}"
    return libs[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emu", metavar="LIB", help="load this emulator library and run on the CPU (torch.ops.imse_emu)")
    ap.add_argument("--emu-build", metavar="NAME", help="build the emulator into build/NAME, load it, run on the CPU")
    ap.add_argument("--asan", action="store_true", help="with --emu-build: AddressSanitizer (preload libasan)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (for slow tools such as racecheck)")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.emu_build:
        os.environ.pop("LD_PRELOAD", None)  # keep the compiler itself out of the sanitizer
        build_emulator(args.emu_build, asan=args.asan)
        ops, device = torch.ops.imse_emu, torch.device("cpu")
    elif args.emu:
        torch.ops.load_library(args.emu)
        ops, device = torch.ops.imse_emu, torch.device("cpu")
    else:
        import imse_kernels  # noqa: F401  (loads the schema library _C)
        import imse_kernels._C_cuda  # noqa: F401
        if not torch.cuda.is_available():
            print("cuda_memcheck_case: no CUDA device", file=sys.stderr)
            return 2
        ops, device = torch.ops.imse_ext, torch.device("cuda")
    shapes = SMALL_SHAPES[:3] if args.quick else SMALL_SHAPES
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    cases = sweep(ops, device, shapes, dtypes)
    check_determinism(ops, 70, 40, 48, 24, torch.bfloat16, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_memcheck_case: {cases} cases passed on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
