"""Launchers that cannot misbehave (docs/design.md, section 5), on the CPU through the interpreter:
a strided bias, codes outside [0, K) (NaN rows, as the CUDA gather kernel gives, and never a read
outside the code table), large code tables sent to the segmented ATen path instead of a one-hot tile
that compiles for minutes, fp32 with IEEE dots served by cuBLAS unless asked otherwise, and per-sample
codes for which the compile check left `chain` no tile served by the ATen path."""
import contextlib

import pytest
import torch

pytest.importorskip("triton")

from imse_kernels import spectral_linear, use_backend  # noqa: E402
from imse_kernels.backends import base, get_backend, unavailable_reason  # noqa: E402
from imse_kernels.backends.triton_backend import TritonBackend  # noqa: E402
from imse_kernels.triton_kernels import chain as chain_module  # noqa: E402
from imse_kernels.triton_kernels import runtime, tuning  # noqa: E402
from imse_kernels.triton_kernels.chain import chain  # noqa: E402

MAX_CODES = getattr(chain_module, "MAX_CODES", 64)
from helpers import oracle_forward, spectral_inputs  # noqa: E402

from imse_kernels.triton_kernels.scaled_matmul import scaled_matmul  # noqa: E402

pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None or not runtime.INTERPRETED,
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1)")


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as every second element of a buffer twice as long."""
    buf = torch.full((2 * t.numel(),), 1e4, dtype=t.dtype)
    buf[::2] = t
    return buf[::2]


def _rel(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("variant", ["fused", "split"])
def test_a_strided_bias_is_added_correctly_by_the_kernels(variant):
    x, U, s, Vh, b = spectral_inputs(9, 37, 26, 21, torch.float32)
    bs = _strided(b)
    assert not bs.is_contiguous() and torch.equal(bs, b)
    with tuning.force(variant):
        y, _ = get_backend("triton").factorized_forward(x, U, s, Vh, bs, False)
    assert _rel(y, oracle_forward(x, U, s, Vh, b)[0]) < 1e-5
    y_chain = chain(x, Vh.t(), s, U.t(), bs)[0]
    y_mm = scaled_matmul(x @ Vh.t(), U.t(), s, bs, scale="k")[0]
    for got in (y_chain, y_mm):
        assert _rel(got, oracle_forward(x, U, s, Vh, b)[0]) < 1e-5


def test_a_strided_bias_through_spectral_linear():
    x, U, s, Vh, b = spectral_inputs(9, 37, 26, 21, torch.float32)
    with use_backend("triton"):
        y = spectral_linear(x, U, s, Vh, _strided(b))
    assert _rel(y, oracle_forward(x, U, s, Vh, b)[0]) < 1e-5


# ------------------------------------------------------------------------------------------------
# Codes outside [0, K)

def _coded(n=7, d_in=37, d_out=26, r=21, k=4, dtype=torch.float32):
    x, U, _, Vh, b = spectral_inputs(n, d_in, d_out, r, dtype)
    S = torch.rand(k, r) + 0.5
    return x, U, S, Vh, b


BAD = torch.tensor([1, -1, 3, 4, 0, 1000, 2])  # K = 4: rows 1, 3 and 5 are out of range
GOOD_ROWS = [0, 2, 4, 6]
BAD_ROWS = [1, 3, 5]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_of_range_codes_give_nan_rows_and_skip_ds(backend):
    """As the CUDA gather kernel does: a row with a code outside [0, K) comes out NaN (forward and
    input gradient), and contributes to no code's dS; every other row is exact."""
    x, U, S, Vh, b = _coded()
    be = get_backend(backend)
    y, h = be.indexed_forward(x, U, S, Vh, b, BAD, True)
    assert torch.isnan(y[BAD_ROWS]).all() and torch.isfinite(h).all()
    ok = torch.tensor(GOOD_ROWS)
    ref, _ = get_backend("torch").indexed_forward(x[ok], U, S, Vh, b, BAD[ok], True)
    assert _rel(y[ok], ref) < 1e-5
    g = torch.randn(7, 26)
    dx, dS = be.indexed_backward(g, h, U, S, Vh, BAD, True)
    assert torch.isnan(dx[BAD_ROWS]).all() and torch.isfinite(dx[ok]).all()
    dx_ref, dS_ref = get_backend("torch").indexed_backward(g[ok], h[ok], U, S, Vh, BAD[ok], True)
    assert torch.isfinite(dS).all() and _rel(dS, dS_ref) < 1e-5 and _rel(dx[ok], dx_ref) < 1e-5
    dx_only = be.indexed_input_grad(g, U, S, Vh, BAD)
    assert torch.isnan(dx_only[BAD_ROWS]).all() and _rel(dx_only[ok], dx_ref) < 1e-5


def test_the_chain_kernel_never_reads_outside_the_code_table(monkeypatch):
    """The s load uses the clamped code: a table whose neighbouring memory is poison (inf) still
    gives finite rows for good codes and NaN (not inf) for bad ones."""
    x, U, S, Vh, b = _coded()
    buf = torch.full((S.shape[0] + 2, S.shape[1]), float("inf"))
    buf[1:-1] = S
    table = buf[1:-1]  # rows -1 and K of this view hold inf
    y, _, _ = chain(x, Vh.t(), table, U.t(), b, index=BAD)
    assert torch.isnan(y[BAD_ROWS]).all()
    assert torch.isfinite(y[GOOD_ROWS]).all()


def test_out_of_range_codes_under_torch_compile_are_nan_rows_not_a_crash():
    """torch.compile skips the op's range check (no host sync in a graph): the kernels make it safe."""
    x, U, S, Vh, b = _coded()

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, S, index):
        return spectral_linear(x, U, S, Vh, b, index=index)

    with use_backend("triton"):
        y = f(x, S, BAD)
    assert torch.isnan(y[BAD_ROWS]).all() and torch.isfinite(y[GOOD_ROWS]).all()
    with pytest.raises(IndexError, match=r"index values must be in \[0, K=4\)"):
        spectral_linear(x, U, S, Vh, b, index=BAD)  # eager: the range check names the problem


def test_aten_helpers_are_safe_for_out_of_range_codes():
    h = torch.randn(5, 3)
    S = torch.rand(2, 3)
    idx = torch.tensor([0, 2, 1, -3, 1])
    out = base.gather_scale(h, S, idx)
    assert torch.isnan(out[[1, 3]]).all() and torch.equal(out[[0, 2, 4]], h[[0, 2, 4]] * S[[0, 1, 1]])
    sums = base.segment_sum(h, idx, 2)
    torch.testing.assert_close(sums, torch.stack([h[0], h[2] + h[4]]))
    torch.testing.assert_close(base.sorted_segment_sum(h, idx, 2), sums)


# ------------------------------------------------------------------------------------------------
# Large code tables, fp32 with IEEE dots

def test_a_large_code_table_runs_on_the_segmented_aten_path(monkeypatch):
    launched = []
    real = chain_module.chain_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(chain_module, "chain_kernel", Spy())
    x, U, S, Vh, b = _coded(k=MAX_CODES + 1)
    index = torch.arange(7) * 9
    tb = get_backend("triton")
    y, h = tb.indexed_forward(x, U, S, Vh, b, index, True)
    assert not launched
    ref, _ = get_backend("torch").indexed_forward(x, U, S, Vh, b, index, True)
    torch.testing.assert_close(y, ref)
    small = _coded(k=MAX_CODES)
    tb.indexed_forward(small[0], small[1], small[2], small[3], small[4], index % MAX_CODES, False)
    assert len(launched) == 1
    with pytest.raises(ValueError, match=f"at most {MAX_CODES} codes"):
        chain(x, Vh.t(), S, U.t(), b, index=index)


@pytest.mark.parametrize("dtype,precision,capability,expected", [
    (torch.float32, "ieee", 90, "blas"),     # FMA dots: slower than cuBLAS's
    (torch.float32, "tf32", 90, "fused"),
    (torch.bfloat16, "ieee", 90, "fused"),
    (torch.float32, "ieee", 0, "fused"),     # the interpreter tests the kernels themselves
])
def test_fp32_without_tf32_defaults_to_cublas_on_a_gpu(dtype, precision, capability, expected):
    assert TritonBackend._default_variant("fused", dtype, precision, capability) == expected


def test_the_fp32_default_still_lets_the_tuner_or_a_forced_variant_pick_kernels(monkeypatch):
    monkeypatch.setattr(runtime, "capability", lambda device: 90)
    monkeypatch.setattr(runtime, "dot_precision", lambda dtype: "ieee")
    monkeypatch.setattr(tuning, "candidates", lambda kernel, *args, **kwargs: [tuning.INTERPRETER[kernel]])
    monkeypatch.setattr(tuning, "default", lambda kernel, *args, **kwargs: tuning.INTERPRETER[kernel])
    x, U, s, Vh, b = spectral_inputs(9, 37, 26, 21, torch.float32)
    seen = {}
    real_choose = tuning.choose

    def spy(key, device, candidates, default):
        seen["default"] = default
        return real_choose(key, device, candidates, default)

    monkeypatch.setattr(tuning, "choose", spy)
    tb = get_backend("triton")
    tb.factorized_forward(x, U, s, Vh, b, False)
    assert seen["default"] == "blas"
    with tuning.force("fused"):
        y, _ = tb.factorized_forward(x, U, s, Vh, b, False)
    assert _rel(y, oracle_forward(x, U, s, Vh, b)[0]) < 1e-5


class _Offered(Exception):
    pass


@pytest.mark.parametrize("layout,sizes", [("aligned", (9, 32, 48, 16)), ("unaligned", (9, 37, 26, 21))])
def test_dropped_tiles_are_never_offered_and_a_kernel_without_tiles_is_not_the_default(monkeypatch, layout, sizes):
    """tuning.DROPPED (configurations the compile check found spilling) removes tiles from the tuner's
    candidates and the defaults, per layout (runtime.aligned); a variant whose kernel has none left
    falls to the next one."""
    monkeypatch.setattr(runtime, "capability", lambda device: 90)
    chain_names = frozenset(c.name for c in tuning.CANDIDATES["chain"][90])
    first_mm = tuning.CANDIDATES["scaled_matmul"][90][0].name
    monkeypatch.setattr(tuning, "DROPPED", {("chain", 90, "16bit", "plain", layout): chain_names,
                                            ("scaled_matmul", 90, "16bit", "plain", layout): frozenset({first_mm})})
    seen = {}

    def spy(key, device, candidates, default):
        seen.update(key=key, candidates=list(candidates), default=default)
        raise _Offered

    monkeypatch.setattr(tuning, "choose", spy)
    x, U, s, Vh, b = spectral_inputs(*sizes, torch.bfloat16)
    assert runtime.aligned((x, U, Vh, b), sizes[1:]) == (layout == "aligned")
    with pytest.raises(_Offered):
        get_backend("triton").factorized_forward(x, U, s, Vh, b, False)
    assert seen["key"].endswith("|" + layout)
    assert not [n for n in seen["candidates"] if n.startswith("fused/")]
    assert f"split/{first_mm}" not in seen["candidates"]
    assert seen["default"] == f"split/{tuning.CANDIDATES['scaled_matmul'][90][1].name}"  # small M: first kept tile
    assert tuning.default("chain", 90, 9, aligned=layout == "aligned") == tuning.CANDIDATES["chain"][90][0]
    other = "unaligned" if layout == "aligned" else "aligned"
    assert len(tuning.candidates("chain", 90, aligned=other == "aligned")) == len(chain_names)  # the other layout


def test_runtime_aligned_is_the_jit_specialisation_of_vit_shapes():
    a = torch.zeros(4, 64)
    assert runtime.aligned((a,), (64,))
    assert not runtime.aligned((a,), (64, 45))              # an odd size
    assert not runtime.aligned((a[:, 1:],), (63,))          # a misaligned start and an odd size
    assert not runtime.aligned((a.view(-1)[1:65].view(1, 64),), (64,))  # starts 4 bytes into the storage
    assert runtime.aligned((a.view(-1)[16:].view(3, 80), None), (80,))  # 64 bytes in, stride 80: aligned
    assert not runtime.aligned((a[:, ::2],), (32,)) and runtime.aligned((a.t(),), (64,))


# ------------------------------------------------------------------------------------------------
# Per-sample codes where the compile check left `chain` no tile

# (capability, dot precision of fp32 operands, layout) of the per-sample-code problems for which the real
# tuning.DROPPED removes every `chain` tile (the compile check's tables: 0.4-26 KB spilled per thread).
NO_CHAIN_TILE = [(80, "ieee", "unaligned"), (90, "ieee", "aligned"), (90, "ieee", "unaligned"),
                 (90, "tf32", "unaligned")]
CODED_SIZES = {"aligned": (9, 32, 48, 16), "unaligned": (9, 37, 26, 21)}  # n, d_in, d_out, r


def _coded_problem(layout: str, k: int = 4):
    n, d_in, d_out, r = CODED_SIZES[layout]
    x, U, _, Vh, b = spectral_inputs(n, d_in, d_out, r, torch.float32)
    S = torch.rand(k, r, generator=torch.Generator().manual_seed(1)) + 0.5
    index = torch.tensor([(3 * i + 1) % k for i in range(n)])
    return x, U, S, Vh, b, index


def _as_gpu(monkeypatch, capability: int, precision: str, answer=None) -> list:
    """The backend sees a GPU of `capability` with fp32 dots at `precision`; returns the list of the tuner's
    questions (key, candidates, default), answered by tuning.choose or by `answer`."""
    monkeypatch.setattr(runtime, "capability", lambda device: capability)
    monkeypatch.setattr(runtime, "dot_precision", lambda dtype: precision if dtype == torch.float32 else "ieee")
    asked, answer = [], answer or tuning.choose

    def spy(key, device, candidates, default):
        asked.append((key, list(candidates), default))
        return answer(key, device, candidates, default)

    monkeypatch.setattr(tuning, "choose", spy)
    return asked


@pytest.mark.parametrize("capability,precision,layout", NO_CHAIN_TILE)
def test_per_sample_codes_without_a_chain_tile_run_on_the_aten_path(monkeypatch, capability, precision, layout):
    """Where tuning.DROPPED leaves `chain` no tile for the per-sample-code launches (fp32 IEEE on sm_90;
    unaligned fp32 IEEE on sm_80; unaligned TF32 on sm_90), the Triton backend offers the tuner `blas`
    alone, the protocol's ATen path (backends/base.py), also under a forced variant: no chain kernel
    launches, and forward, backward and input gradient match the float64 oracle."""
    aligned = layout == "aligned"
    assert tuning.candidates("chain", capability, True, precision, codes=True, aligned=aligned) == []
    asked = _as_gpu(monkeypatch, capability, precision)
    launched = []

    class NoLaunch:
        def __getitem__(self, grid):
            launched.append(grid)
            raise AssertionError("a chain kernel launched for a problem with no chain tile left")

    monkeypatch.setattr(chain_module, "chain_kernel", NoLaunch())
    x, U, S, Vh, b, index = _coded_problem(layout)
    assert runtime.aligned((x, U, Vh, b), (x.shape[1], *U.shape)) == aligned
    g = torch.randn(x.shape[0], U.shape[0], generator=torch.Generator().manual_seed(2))
    ref = get_backend("torch")
    y64, h64 = ref.indexed_forward(x.double(), U.double(), S.double(), Vh.double(), b.double(), index, True)
    dx64, dS64 = ref.indexed_backward(g.double(), h64, U.double(), S.double(), Vh.double(), index, True)
    tb = get_backend("triton")
    for forced in (None, "fused"):
        with tuning.force(forced) if forced else contextlib.nullcontext():
            y, h = tb.indexed_forward(x, U, S, Vh, b, index, True)
            dx, dS = tb.indexed_backward(g, h, U, S, Vh, index, True)
            dx_only = tb.indexed_input_grad(g, U, S, Vh, index)
        for got, want in ((y, y64), (h, h64), (dx, dx64), (dS, dS64), (dx_only, dx64)):
            assert _rel(got, want) < 1e-5
    assert not launched
    assert len(asked) == 6 and all(cands == ["blas"] and default == "blas" for _, cands, default in asked), asked
    assert all(key.endswith("|" + layout) for key, _, _ in asked[:3])


@pytest.mark.parametrize("capability,precision,layout", NO_CHAIN_TILE)
def test_with_nothing_dropped_the_same_problems_would_offer_chain_tiles(monkeypatch, capability, precision, layout):
    """The test above depends on tuning.DROPPED: with it emptied, the same calls offer `fused/` tiles, and
    TF32 (whose default is the kernel) would launch one by default."""
    monkeypatch.setattr(tuning, "DROPPED", {})

    def stop(key, device, candidates, default):
        raise _Offered

    asked = _as_gpu(monkeypatch, capability, precision, answer=stop)
    x, U, S, Vh, b, index = _coded_problem(layout)
    with pytest.raises(_Offered):
        get_backend("triton").indexed_forward(x, U, S, Vh, b, index, True)
    _, cands, default = asked[0]
    assert len([n for n in cands if n.startswith("fused/")]) == len(tuning.CANDIDATES["chain"][capability])
    assert (default == "blas") if precision == "ieee" else default.startswith("fused/")


@pytest.mark.parametrize("capability,layout", [(80, "aligned"), (80, "unaligned"), (90, "aligned"),
                                               (90, "unaligned")])
def test_fp32_ieee_per_sample_codes_default_to_aten_on_every_gpu_and_layout(monkeypatch, capability, layout):
    """Without timing, fp32 IEEE per-sample codes run on the ATen path on sm_80 and sm_90 in either layout;
    the tuner (IMSE_TRITON_TUNE=1) is offered only the chain tiles tuning.DROPPED kept (on sm_80 aligned
    the small-row tile; none elsewhere)."""
    asked = _as_gpu(monkeypatch, capability, "ieee")
    x, U, S, Vh, b, index = _coded_problem(layout)
    y, _ = get_backend("triton").indexed_forward(x, U, S, Vh, b, index, False)
    y64, _ = get_backend("torch").indexed_forward(x.double(), U.double(), S.double(), Vh.double(), b.double(),
                                                  index, False)
    assert _rel(y, y64) < 1e-5
    _, cands, default = asked[0]
    kept = [c.name for c in tuning.candidates("chain", capability, True, "ieee", codes=True,
                                                aligned=layout == "aligned")]
    assert default == "blas" and cands == [f"fused/{n}" for n in kept] + ["blas"]
    assert len(kept) == (1 if (capability, layout) == (80, "aligned") else 0)
