"""CPU-side checks of the C++/CUDA backend (csrc/cuda).

1. The build: the compiled `imse_kernels._C_cuda` holds machine code for sm_80 and sm_90, only the
   custom kernels that cuBLAS cannot replace (the fused chain, the deterministic ds reduction, and
   for per-sample codes the gather-scale and the segmented dS), and registers the five `imse_ext`
   primitives and the three indexed ones for the CUDA dispatch key plus the switch op
   `imse_ext::cuda_fused_mode` (skipped only when torch has no CUDA build or nvcc is absent).
2. The kernels themselves, on the CPU: csrc/cuda/spectral_kernels.cu and the torch-facing code
   csrc/cuda/spectral_ops.h are compiled with the host compiler against csrc/cuda/emu/cuda_emu.h, a
   small CUDA emulator (blocks of real threads meeting at __syncthreads, NaN-filled shared memory,
   WMMA with its alignment rules checked), and registered as `torch.ops.imse_emu.*` for CPU tensors
   (their GEMMs then run on ATen's CPU path). They are compared with the torch backend (float64
   oracle) for every dtype, custom kernels on and off, odd shapes, N = 1, truncated rank; the switch
   is checked by counting emulated launches; and all of it runs once under AddressSanitizer.
   None of this replaces running on a GPU (tests/gpu/test_cuda_gpu.py); it checks indexing, bounds,
   tiling, reductions, synchronisation order and the launcher logic.
3. Per-sample codes (docs/design.md §8): the three `indexed_*` ops (gather-scale kernel, deterministic
   segmented dS kernel, or their ATen path with the switch off), emulated the same way, against a
   float64 per-code loop: odd shapes, N = 1, K = 1, codes no row uses, every dtype, bitwise
   determinism, the switch, and the public op through the emulated backend.
"""
import importlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import cuda_memcheck_case as case
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA_SRC = ROOT / "csrc" / "cuda"
OPS = ("factorized_forward", "recompose", "factorized_backward", "factorized_input_grad", "recomposed_backward")
INDEXED_OPS = ("indexed_forward", "indexed_backward", "indexed_input_grad")


# ------------------------------------------------------------------------------------------------
# 1. The build

def _cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or "/usr/local/cuda"


def _nvcc() -> str | None:
    path = os.path.join(_cuda_home(), "bin", "nvcc")
    return path if os.path.exists(path) else None


def _cuda_build_expected():
    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA build: the CUDA extension is not built")
    if _nvcc() is None:
        pytest.skip(f"nvcc absent (looked for {_cuda_home()}/bin/nvcc): the CUDA extension is not built")
    if os.environ.get("IMSE_CUDA", "auto").strip().lower() in ("0", "false", "no", "off") or \
            os.environ.get("IMSE_NO_EXTENSION", "0").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("the CUDA extension was disabled for this build (IMSE_CUDA=0 or IMSE_NO_EXTENSION=1)")


def _cuda_library() -> Path:
    spec = importlib.util.find_spec("imse_kernels._C_cuda")
    assert spec is not None and spec.origin, (
        "torch has CUDA and nvcc is present, but imse_kernels._C_cuda was not built: "
        "run `pip install .` (or `python setup.py build_ext --inplace`)")
    return Path(spec.origin)


def _cuobjdump() -> str | None:
    candidates = [os.path.join(_cuda_home(), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:  # Triton wheels carry one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _fatbin_archs(path: Path) -> tuple[set[int], set[int]]:
    """(SM versions of the embedded cubins, of the embedded PTX), read from the .nv_fatbin section."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF shared library"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx][4]
    fatbin = None
    for name, _type, _flags, _addr, off, size in sections:
        if data[strtab + name:data.index(b"\0", strtab + name)] == b".nv_fatbin":
            fatbin = data[off:off + size]
    assert fatbin is not None, f"{path.name} has no .nv_fatbin section: no device code was linked in"
    elfs, ptx = set(), set()
    pos = 0
    while pos + 16 <= len(fatbin):
        magic, _version, header, size = struct.unpack_from("<IHHQ", fatbin, pos)
        if magic != 0xBA55ED50:
            pos += 8  # fatbins are 8-byte aligned inside the section
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _ver, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, entry)
            arch = struct.unpack_from("<I", fatbin, entry + 28)[0]
            (elfs if kind == 2 else ptx).add(arch)
            entry += entry_header + payload
        pos = end
    return elfs, ptx


def test_cuda_library_holds_sm80_and_sm90_code():
    _cuda_build_expected()
    lib = _cuda_library()
    elfs, ptx = _fatbin_archs(lib)
    assert {80, 90} <= elfs, f"{lib.name}: cubins for sm_{sorted(elfs)} only; expected sm_80 and sm_90"
    tool = _cuobjdump()
    if tool is not None:  # the NVIDIA tool agrees with the section walk
        out = subprocess.run([tool, "--list-elf", str(lib)], capture_output=True, text=True, check=True).stdout
        for sm in ("sm_80", "sm_90"):
            assert f".{sm}.cubin" in out, f"cuobjdump --list-elf shows no {sm} cubin:\n{out}"
        syms = subprocess.run([tool, "--dump-elf-symbols", str(lib)], capture_output=True, text=True).stdout
        for kernel in ("fused_kernel", "colsum_kernel", "reduce_kernel", "gather_scale_kernel",
                       "segment_partial_kernel", "segment_reduce_kernel"):
            assert kernel in syms, f"kernel {kernel} missing from the device code"
        for kernel in ("gemm_tc_kernel", "gemm_simt_kernel"):  # plain GEMMs are cuBLAS's
            assert kernel not in syms, f"hand-written GEMM {kernel} is back in the device code"


def test_cuda_ops_registered_for_cuda_key():
    _cuda_build_expected()
    _cuda_library()
    import imse_kernels  # noqa: F401  (defines the schema through _C)

    importlib.import_module("imse_kernels._C_cuda")
    for op in OPS + INDEXED_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"imse_ext::{op}", "CUDA"), \
            f"imse_ext::{op} has no CUDA kernel"
    schema = str(torch.ops.imse_ext.indexed_backward.default._schema)
    assert schema.startswith("imse_ext::indexed_backward(Tensor grad, Tensor h, Tensor U, Tensor S, Tensor Vh, "
                             "Tensor index, bool need_dx)"), schema
    schema = str(torch.ops.imse_ext.factorized_forward.default._schema)
    assert schema.startswith("imse_ext::factorized_forward(Tensor x, Tensor U, Tensor s, Tensor Vh, "
                             "Tensor? bias, bool save_h)"), schema


def test_cuda_switch_op_registered():
    _cuda_build_expected()
    _cuda_library()
    from imse_kernels.backends.compiled_backend import FUSED_KERNELS, cuda_fused_kernels

    ops = torch.ops.imse_ext
    before = {k: ops.cuda_fused_mode(k) for k in FUSED_KERNELS}
    with cuda_fused_kernels(False):  # default namespace: the real CUDA ops
        assert all(ops.cuda_fused_mode(k) == 0 for k in FUSED_KERNELS)
        with cuda_fused_kernels(True, kernels="ds"):
            assert ops.cuda_fused_mode("ds") == 1 and ops.cuda_fused_mode("chain") == 0
    assert {k: ops.cuda_fused_mode(k) for k in FUSED_KERNELS} == before


def test_cuda_backend_availability_is_explained():
    from imse_kernels.backends import unavailable_reason
    from imse_kernels.backends.compiled_backend import CudaBackend

    backend = CudaBackend()
    assert backend.supports(torch.device("cuda")) and backend.supports(torch.device("cuda", 1))
    assert not backend.supports(torch.device("cpu"))
    reason = unavailable_reason("cuda")
    if torch.cuda.is_available() and reason is None:
        return
    assert reason, "the cuda backend is unavailable here and must say why"
    if torch.version.cuda is None:
        assert "without CUDA" in reason
    elif not torch.cuda.is_available() and importlib.util.find_spec("imse_kernels._C_cuda") is not None:
        assert "no CUDA device" in reason, reason


# ------------------------------------------------------------------------------------------------
# 2. The kernels, emulated on the CPU

def _have_compiler():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no host C++ compiler")


@pytest.fixture(scope="module")
def emu():
    _have_compiler()
    case.build_emulator("imse_cuda_emu")
    return torch.ops.imse_emu


CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_emulated_primitives_match_torch_backend(emu, dtype):
    case.sweep(emu, CPU, case.SMALL_SHAPES, [dtype], own_oracle=True)


def test_emulated_fused_forward_many_blocks(emu):
    # Fused kernel with several row blocks, several output tiles and r spanning two chunks.
    with case.env(IMSE_CUDA_FUSED="1"):
        case.check_primitives(emu, 140, 48, 136, 136, torch.bfloat16, CPU, bias=True)
        case.check_primitives(emu, 65, 24, 20, 130, torch.float16, CPU, bias=False)
        case.check_primitives(emu, 1, 24, 20, 130, torch.bfloat16, CPU, bias=True)


def _launches(emu, fn) -> int:
    """Emulated kernel launches made by fn(): 0 means it ran on the ATen path alone."""
    before = emu.launches()
    fn()
    return emu.launches() - before


def _calls(emu, dtype=torch.bfloat16):
    x, U, s, Vh, b, grad = case.make_inputs(70, 40, 48, 24, dtype, CPU)
    _, h = emu.factorized_forward(x, U, s, Vh, b, True)
    W = emu.recompose(U, s, Vh)
    return {"forward": lambda: emu.factorized_forward(x, U, s, Vh, b, False),
            "forward_h": lambda: emu.factorized_forward(x, U, s, Vh, b, True),
            "recompose": lambda: emu.recompose(U, s, Vh),
            "backward": lambda: emu.factorized_backward(grad, h, U, s, Vh, True),
            "input_grad": lambda: emu.factorized_input_grad(grad, U, s, Vh),
            "recomposed_backward": lambda: emu.recomposed_backward(grad, x, U, s, Vh, W, True)}


# Emulated launches per call with every custom kernel on: chain 1, ds 2 (partials + fixed-order sum).
_ON = {"forward": 1, "forward_h": 0, "recompose": 0, "backward": 2, "input_grad": 1, "recomposed_backward": 2}


def test_emulated_auto_leaves_the_fused_chain_off_until_measured(emu):
    # auto runs the fused chain only on an architecture where it was measured faster than cuBLAS:
    # none yet, so not on sm_90 or sm_80 even where its row blocks fill the "GPU" (IMSE_EMU_SMS=1);
    # forced on (IMSE_CUDA_FUSED=1) it runs. The ds kernel is on under auto either way.
    for cc in ("90", "80"):
        for sms in ("1", "1000"):
            with case.env(IMSE_EMU_SMS=sms, IMSE_EMU_CC=cc, IMSE_CUDA_FUSED=None):
                case.check_primitives(emu, 70, 40, 48, 24, torch.bfloat16, CPU)
                calls = _calls(emu)
                assert _launches(emu, calls["forward"]) == 0 and _launches(emu, calls["input_grad"]) == 0
                assert _launches(emu, calls["backward"]) == 2
        with case.env(IMSE_EMU_SMS="1", IMSE_EMU_CC=cc, IMSE_CUDA_FUSED="1"):
            calls = _calls(emu)
            assert _launches(emu, calls["forward"]) == 1 and _launches(emu, calls["input_grad"]) == 1


def test_emulated_switch_selects_aten_path(emu):
    from imse_kernels.backends.compiled_backend import FUSED_KERNELS, cuda_fused_kernels

    assert FUSED_KERNELS == ("chain", "ds")
    assert [emu.cuda_fused_mode(k) for k in FUSED_KERNELS] == [-2, -2], "default: follow IMSE_CUDA_FUSED"
    calls = _calls(emu)
    with case.env(IMSE_CUDA_FUSED="1"):
        assert {k: _launches(emu, f) for k, f in calls.items()} == _ON
        with cuda_fused_kernels(False, ops=emu):  # the context manager wins over the variable
            assert [emu.cuda_fused_mode(k) for k in FUSED_KERNELS] == [0, 0]
            assert all(_launches(emu, f) == 0 for f in calls.values())
            case.check_primitives(emu, 37, 45, 29, 21, torch.bfloat16, CPU)
            with cuda_fused_kernels(True, kernels="ds", ops=emu):
                assert _launches(emu, calls["backward"]) == 2 and _launches(emu, calls["forward"]) == 0
        assert [emu.cuda_fused_mode(k) for k in FUSED_KERNELS] == [-2, -2], "not restored on exit"
        with cuda_fused_kernels(False, kernels=("chain",), ops=emu):
            assert _launches(emu, calls["forward"]) == 0 and _launches(emu, calls["backward"]) == 2
    for off in ("0", "off", "False"):
        with case.env(IMSE_CUDA_FUSED=off):
            assert all(_launches(emu, f) == 0 for f in calls.values()), off
    with case.env(IMSE_CUDA_FUSED="sometimes"), \
            pytest.raises(RuntimeError, match="IMSE_CUDA_FUSED must be auto, 1 or 0"):
        calls["forward"]()
    with pytest.raises(RuntimeError, match="kernel must be 'chain' or 'ds'"):
        emu.cuda_fused_mode("gemm")
    with pytest.raises(RuntimeError, match="mode must be"):
        emu.cuda_fused_mode("ds", 7)
    with pytest.raises(ValueError, match="enabled must be"):
        with cuda_fused_kernels(2, ops=emu):
            pass
    with pytest.raises(ValueError, match="unknown kernels"):
        with cuda_fused_kernels(False, kernels=("gemm",), ops=emu):
            pass
    # fp32 and fp64 have no chain kernel: only ds runs custom code.
    for dtype in (torch.float32, torch.float64):
        with case.env(IMSE_CUDA_FUSED="1"):
            assert {k: _launches(emu, f) for k, f in _calls(emu, dtype).items()} == dict(_ON, forward=0, input_grad=0)


def test_emulated_determinism(emu):
    case.check_determinism(emu, 70, 40, 48, 24, torch.bfloat16, CPU)
    case.check_determinism(emu, 600, 40, 48, 24, torch.float32, CPU)


@pytest.mark.parametrize("fused", ["0", "1"])
def test_emulated_empty_and_degenerate_shapes(emu, fused):
    for n, d_in, d_out, r in [(0, 8, 8, 4), (4, 0, 6, 3), (4, 5, 6, 0)]:
        x, U, s, Vh, b, grad = case.make_inputs(n, d_in, d_out, r, torch.float32, CPU)
        with case.env(IMSE_CUDA_FUSED=fused):
            y, h = emu.factorized_forward(x, U, s, Vh, b, True)
            dx, ds = emu.factorized_backward(grad, h, U, s, Vh, True)
            dxr, dsr = emu.recomposed_backward(grad, x, U, s, Vh, emu.recompose(U, s, Vh), True)
        torch.testing.assert_close(y, (x @ Vh.t() * s) @ U.t() + b, atol=1e-5, rtol=1e-5)
        assert dx.shape == (n, d_in) and ds.shape == (r,)
        torch.testing.assert_close(ds, ((grad @ U) * h).sum(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dsr, ds, atol=1e-5, rtol=1e-5)


def test_emulated_input_checks(emu):
    x, U, s, Vh, b, grad = case.make_inputs(6, 8, 5, 4, torch.float32, CPU)
    with pytest.raises(RuntimeError, match=r"factorized_forward: x has shape \[6, 7\] but Vh"):
        emu.factorized_forward(x[:, :7], U, s, Vh, b, True)
    with pytest.raises(RuntimeError, match="U has dtype BFloat16 but x/grad has Float"):
        emu.factorized_forward(x, U.bfloat16(), s, Vh, b, True)
    with pytest.raises(RuntimeError, match="s must be float32 or float64"):
        emu.recompose(U, s.half(), Vh)
    with pytest.raises(RuntimeError, match="rank mismatch"):
        emu.recompose(U, s, Vh[:3])
    with pytest.raises(RuntimeError, match="bias has shape"):
        emu.factorized_forward(x, U, s, Vh, b[:4], True)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        emu.factorized_forward(x[None], U, s, Vh, b, True)
    with pytest.raises(RuntimeError, match="takes float16, bfloat16, float32 or float64"):
        emu.factorized_forward(x.int(), U.int(), s, Vh.int(), None, True)
    with pytest.raises(RuntimeError, match=r"h has shape \[6, 3\], expected \(N, r\) = \(6, 4\)"):
        emu.factorized_backward(grad, torch.zeros(6, 3), U, s, Vh, True)
    with pytest.raises(RuntimeError, match="grad has shape"):
        emu.factorized_input_grad(grad[:, :4], U, s, Vh)
    # Non-contiguous inputs are made contiguous, not misread.
    xt = torch.randn(8, 6).t()
    y, _ = emu.factorized_forward(xt, U, s, Vh, b, False)
    torch.testing.assert_close(y, (xt @ Vh.t() * s) @ U.t() + b, atol=1e-5, rtol=1e-5)


def _emulated_cuda_backend():
    """The library's CudaBackend, every primitive included (the indexed ones too), with only its op
    namespace and device check swapped for the emulated ones, so that spectral_linear (autograd, planner,
    both routes, per-sample codes) runs through the CUDA backend's code on CPU tensors."""
    from imse_kernels.backends.compiled_backend import CudaBackend

    class EmulatedCudaBackend(CudaBackend):
        def unavailable_reason(self):
            return None

        def supports(self, device):
            return device.type == "cpu"

        @property
        def _ops(self):
            return torch.ops.imse_emu

    return EmulatedCudaBackend()


@pytest.fixture
def emulated_backend(emu, monkeypatch):
    import imse_kernels.backends as backends

    monkeypatch.setitem(backends._instances, "cuda", _emulated_cuda_backend())
    return backends


@pytest.mark.parametrize("shape", [(2, 3, 7, 12, 3), (4, 4, 4, 4, 4)])  # route F (small r), route R (square)
def test_emulated_spectral_linear_gradcheck(emulated_backend, shape):
    from imse_kernels import spectral_linear
    from imse_kernels.ops.planner import FACTORIZED, RECOMPOSED, plan

    b_, t_, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b_, t_, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    U = torch.randn(d_out, r, dtype=torch.float64, generator=g)
    Vh = torch.randn(r, d_in, dtype=torch.float64, generator=g)
    s = torch.rand(r, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(d_out, dtype=torch.float64, generator=g)
    route = plan(b_ * t_, d_in, d_out, r, True, True, False).route
    assert route == (FACTORIZED if r < min(d_in, d_out) else RECOMPOSED), "pick shapes that reach both routes"
    with emulated_backend.use_backend("cuda"):
        assert emulated_backend.resolve_backend(x.device).name == "cuda"
        assert torch.autograd.gradcheck(lambda x_, s_: spectral_linear(x_, U, s_, Vh, bias), (x, s))
        y = spectral_linear(x, U, s, Vh, bias)
    torch.testing.assert_close(y, (x @ Vh.t() * s) @ U.t() + bias)


# ------------------------------------------------------------------------------------------------
# 3. Per-sample codes (docs/design.md §8), emulated on the CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_emulated_indexed_ops_match_float64_loop(emu, dtype):
    from imse_kernels.backends.torch_backend import TorchBackend

    tb = TorchBackend()  # the ATen defaults of the protocol (backends/base.py), same dtype
    tol = case.TOL[dtype]
    for i, shape in enumerate(case.INDEXED_SHAPES):
        outs = {}
        for fused in ("1", "0"):
            with case.env(IMSE_CUDA_FUSED=fused):
                outs[fused] = case.check_indexed(emu, *shape, dtype, CPU, bias=(i % 2 == 0), seed=i)
        bad = {k: e for k, e in ((k, case.rel_err(outs["1"][k], outs["0"][k])) for k in outs["1"]) if not e <= 2 * tol}
        assert not bad, f"kernels vs ATen path, {dtype} {shape}: {bad}"
        x, U, S, Vh, b, grad, index = case.make_indexed_inputs(*shape, dtype, CPU, i % 2 == 0, i)
        y, h = tb.indexed_forward(x, U, S, Vh, b, index, True)
        dx, dS = tb.indexed_backward(grad, h, U, S, Vh, index, True)
        own = {"y": (outs["1"]["y"], y), "dx": (outs["1"]["dx"], dx), "dS": (outs["1"]["dS"], dS)}
        bad = {k: e for k, e in ((k, case.rel_err(a, o)) for k, (a, o) in own.items()) if not e <= 2 * tol}
        assert not bad, f"differs from the protocol's ATen default in {dtype} {shape}: {bad}"


def _indexed_calls(emu, dtype=torch.float32, n=150, k=4):
    x, U, S, Vh, b, grad, index = case.make_indexed_inputs(n, 24, 20, 40, k, dtype, CPU)
    _, h = emu.indexed_forward(x, U, S, Vh, b, index, True)
    return {"forward": lambda: emu.indexed_forward(x, U, S, Vh, b, index, False),
            "forward_h": lambda: emu.indexed_forward(x, U, S, Vh, b, index, True),
            "backward": lambda: emu.indexed_backward(grad, h, U, S, Vh, index, True),
            "backward_ds": lambda: emu.indexed_backward(grad, h, U, S, Vh, index, False),
            "input_grad": lambda: emu.indexed_input_grad(grad, U, S, Vh, index)}


# Emulated launches per indexed call: gather-scale 1 ("chain" switch), segmented dS 2 ("ds" switch:
# partials + fixed-order reduce; the stable sort by code is ATen's).
_INDEXED_ON = {"forward": 1, "forward_h": 1, "backward": 3, "backward_ds": 2, "input_grad": 1}


def test_emulated_indexed_switch_selects_aten_path(emu):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        calls = _indexed_calls(emu, dtype)
        for env in ("1", None, "auto"):  # auto: both kernels always run (one pass each)
            with case.env(IMSE_CUDA_FUSED=env, IMSE_EMU_SMS="1000"):
                assert {k: _launches(emu, f) for k, f in calls.items()} == _INDEXED_ON, (dtype, env)
        for off in ("0", "off"):
            with case.env(IMSE_CUDA_FUSED=off):
                assert all(_launches(emu, f) == 0 for f in calls.values()), (dtype, off)
    calls = _indexed_calls(emu)
    with case.env(IMSE_CUDA_FUSED="1"):
        with cuda_fused_kernels(False, ops=emu):
            assert all(_launches(emu, f) == 0 for f in calls.values())
            with cuda_fused_kernels(True, kernels="ds", ops=emu):
                assert {k: _launches(emu, f) for k, f in calls.items()} == \
                    {"forward": 0, "forward_h": 0, "backward": 2, "backward_ds": 2, "input_grad": 0}
            with cuda_fused_kernels(True, kernels="chain", ops=emu):
                assert {k: _launches(emu, f) for k, f in calls.items()} == \
                    {"forward": 1, "forward_h": 1, "backward": 1, "backward_ds": 0, "input_grad": 1}


@pytest.mark.parametrize("fused", ["1", "0"])
def test_emulated_indexed_determinism(emu, fused):
    # dS (and every other output) bitwise equal on repeat; several chunks, one code or several.
    for dtype, (n, k) in ((torch.float32, (600, 3)), (torch.bfloat16, (600, 1)), (torch.float64, (257, 40))):
        x, U, S, Vh, b, grad, index = case.make_indexed_inputs(n, 24, 20, 40, k, dtype, CPU, seed=3)
        with case.env(IMSE_CUDA_FUSED=fused):
            first = case.run_indexed(emu, x, U, S, Vh, b, grad, index)
            for _ in range(2):
                again = case.run_indexed(emu, x, U, S, Vh, b, grad, index)
                for key, v in first.items():
                    assert torch.equal(v, again[key]), f"{key} differs between runs ({dtype}, fused={fused})"


@pytest.mark.parametrize("fused", ["1", "0"])
def test_emulated_indexed_empty_and_degenerate_shapes(emu, fused):
    for n, d_in, d_out, r, k in [(0, 8, 8, 4, 3), (4, 0, 6, 3, 2), (4, 5, 6, 0, 2), (0, 5, 6, 3, 0)]:
        x, U, S, Vh, b, grad, index = case.make_indexed_inputs(n, d_in, d_out, r, max(k, 1), torch.float32, CPU)
        S = S[:k]
        with case.env(IMSE_CUDA_FUSED=fused):
            out = case.run_indexed(emu, x, U, S, Vh, b, grad, index)
        ref = case.indexed_reference(x, U, S, Vh, b, grad, index)
        for key in ref:
            torch.testing.assert_close(out[key].double(), ref[key], atol=1e-5, rtol=1e-5)


def test_emulated_indexed_input_checks(emu):
    x, U, S, Vh, b, grad, index = case.make_indexed_inputs(6, 8, 5, 4, 3, torch.float32, CPU)
    _, h = emu.indexed_forward(x, U, S, Vh, b, index, True)
    with pytest.raises(RuntimeError, match="indexed_forward: index must be int64, got Int"):
        emu.indexed_forward(x, U, S, Vh, b, index.int(), True)
    with pytest.raises(RuntimeError, match="indexed_backward: index has 5 entries but grad has 6 rows"):
        emu.indexed_backward(grad, h, U, S, Vh, index[:5], True)
    with pytest.raises(RuntimeError, match="index must be 1-D"):
        emu.indexed_input_grad(grad, U, S, Vh, index[:, None])
    with pytest.raises(RuntimeError, match=r"S has shape \[3, 3\] but the rank r"):
        emu.indexed_forward(x, U, S[:, :3], Vh, b, index, True)
    with pytest.raises(RuntimeError, match="S must be 2-D"):
        emu.indexed_forward(x, U, S[0], Vh, b, index, True)
    with pytest.raises(RuntimeError, match="S must be float32 or float64, got Half"):
        emu.indexed_input_grad(grad, U, S.half(), Vh, index)
    with pytest.raises(RuntimeError, match="U has dtype BFloat16 but x/grad has Float"):
        emu.indexed_forward(x, U.bfloat16(), S, Vh, b, index, True)
    with pytest.raises(RuntimeError, match=r"indexed_forward: x has shape \[6, 7\] but Vh"):
        emu.indexed_forward(x[:, :7], U, S, Vh, b, index, True)
    with pytest.raises(RuntimeError, match=r"h has shape \[6, 3\], expected \(N, r\) = \(6, 4\)"):
        emu.indexed_backward(grad, torch.zeros(6, 3), U, S, Vh, index, True)
    with pytest.raises(RuntimeError, match="grad has shape"):
        emu.indexed_input_grad(grad[:, :4], U, S, Vh, index)
    with pytest.raises(RuntimeError, match="bias has shape"):
        emu.indexed_forward(x, U, S, Vh, b[:4], index, True)
    # Codes out of range are the Python op's to reject; the kernels still never read out of bounds:
    # the gather gives NaN rows and the segmented dS skips them.
    bad = index.clone()
    bad[1], bad[4] = 3, -1
    with case.env(IMSE_CUDA_FUSED="1"):
        y, _ = emu.indexed_forward(x, U, S, Vh, b, bad, False)
        _, dS = emu.indexed_backward(grad, h, U, S, Vh, bad, False)
    ok_rows = torch.ones(6, dtype=torch.bool)
    ok_rows[[1, 4]] = False
    assert y[~ok_rows].isnan().all() and not y[ok_rows].isnan().any()
    assert dS.shape == S.shape and not dS.isnan().any()
    # Non-contiguous inputs are made contiguous, not misread.
    xt = torch.randn(8, 6).t()
    idx = torch.tensor([0, 1, 2, 2, 2, 0, 0, 1, 1, 2, 2, 0])[::2]  # non-contiguous too
    y, _ = emu.indexed_forward(xt, U, S.t().contiguous().t(), Vh, b, idx, False)
    torch.testing.assert_close(y, case.indexed_reference(xt, U, S, Vh, b, grad, idx)["y"].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
def test_emulated_spectral_linear_codes_gradcheck(emulated_backend, per_row):
    # The public op with per-sample codes through the (emulated) CUDA backend's indexed ops.
    from imse_kernels import spectral_linear

    g = torch.Generator().manual_seed(0)
    b_, t_, d_in, d_out, r, k = 3, 4, 7, 12, 3, 4
    x = torch.randn(b_, t_, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    U = torch.randn(d_out, r, dtype=torch.float64, generator=g)
    Vh = torch.randn(r, d_in, dtype=torch.float64, generator=g)
    S = torch.rand(k, r, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(d_out, dtype=torch.float64, generator=g)
    index = torch.randint(0, k - 1, (b_, t_) if per_row else (b_,), generator=g)  # code k-1 unused
    with emulated_backend.use_backend("cuda"), case.env(IMSE_CUDA_FUSED="1"):
        before = torch.ops.imse_emu.launches()
        assert torch.autograd.gradcheck(lambda x_, S_: spectral_linear(x_, U, S_, Vh, bias, index=index), (x, S))
        assert torch.ops.imse_emu.launches() > before, "the indexed ops did not run the emulated kernels"
        y = spectral_linear(x, U, S, Vh, bias, index=index)
        y.backward(torch.ones_like(y))
    rows = index.reshape(-1) if per_row else index.repeat_interleave(t_)
    ref = case.indexed_reference(x.detach().reshape(-1, d_in), U, S.detach(), Vh, bias,
                                 torch.ones(b_ * t_, d_out, dtype=torch.float64), rows)
    torch.testing.assert_close(y.detach().reshape(-1, d_out), ref["y"])
    torch.testing.assert_close(S.grad, ref["dS"])
    assert torch.equal(S.grad[k - 1], torch.zeros(r, dtype=torch.float64))


def _sanitizer_runtime(name: str) -> str:
    lib = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not lib or not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.skip(f"{name} is not available to the host compiler")
    return lib


@pytest.mark.slow
def test_emulated_kernels_race_free_under_thread_sanitizer(tmp_path):
    # The torch-free self test (csrc/cuda/emu/emu_selftest.cpp) with ThreadSanitizer: a shared-memory
    # read not ordered after its write by __syncthreads (a missing barrier) is reported as a race.
    _sanitizer_runtime("libtsan.so")
    exe = tmp_path / "emu_selftest_tsan"
    emu_dir = CUDA_SRC / "emu"
    subprocess.run([os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-g", "-fsanitize=thread",
                    "-Wno-unknown-pragmas", str(emu_dir / "emu_selftest.cpp"), str(emu_dir / "emu_kernels.cpp"),
                    "-o", str(exe), "-lpthread"],
                   check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1:exitcode=66"))
    assert proc.returncode == 0 and "ThreadSanitizer" not in proc.stderr, \
        f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "0 failures" in proc.stdout


@pytest.mark.slow
def test_emulated_kernels_under_address_sanitizer():
    libasan = _sanitizer_runtime("libasan.so")
    _have_compiler()
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:exitcode=23")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_memcheck_case.py"), "--emu-build",
                           "imse_cuda_emu_asan", "--asan", "--quick"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)
    assert proc.returncode == 0, \
        f"AddressSanitizer run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "cases passed" in proc.stdout
    # The per-sample-code kernels (docs/design.md §8) in the same AddressSanitizer library.
    script = (
        "import glob, os, sys, torch\n"
        "sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))\n"
        "torch.ops.load_library(glob.glob('build/imse_cuda_emu_asan/imse_cuda_emu_asan*.so')[0])\n"
        "import cuda_memcheck_case as case\n"
        "n = 0\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):\n"
        "    for fused in ('1', '0'):\n"
        "        with case.env(IMSE_CUDA_FUSED=fused):\n"
        "            for i, shape in enumerate(case.INDEXED_SHAPES):\n"
        "                case.check_indexed(torch.ops.imse_emu, *shape, dtype, torch.device('cpu'), "
        "bias=i % 2 == 0, seed=i)\n"
        "                n += 1\n"
        "print(f'indexed: {n} cases passed')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(ROOT),
                          timeout=900)
    assert proc.returncode == 0, (f"AddressSanitizer run (indexed ops) failed (rc {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert "indexed: 56 cases passed" in proc.stdout
