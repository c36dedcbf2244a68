"""The C++ CPU backend's per-sample-code ops (docs/design.md §8): `torch.ops.imse_ext.indexed_forward`,
`indexed_backward`, `indexed_input_grad`, called directly against a float64 per-code loop (values,
h, dx, dS) per dtype, for odd shapes, N = 0 and 1, K = 1, unused codes, non-contiguous inputs,
bitwise determinism across runs and thread counts, and bad inputs; then that `spectral_linear(...,
index=...)` under `use_backend("cpu")` reaches them and agrees with the torch backend."""
import pytest
import torch
from helpers import code_table, factors, per_code_oracle

import imse_kernels
from imse_kernels import spectral_linear, use_backend

pytestmark = pytest.mark.skipif("cpu" not in imse_kernels.available_backends(),
                                reason="the C++ CPU extension imse_kernels._C is not available")

# relative bound (max |error| / max |reference|) per input dtype: y, dx / dS (docs/design.md §4)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def _ops():
    return torch.ops.imse_ext


def _rel(a, ref):
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (a.double() - ref).abs().max().item() if ref.numel() else 0.0
    return err / max(scale, 1e-300)


def _problem(n, d_in, d_out, r, k, dtype, codes=None, bias=True, seed=0):
    torch.manual_seed(seed)
    U, _, Vh, b = factors(d_in, d_out, r, torch.float64, bias=bias)
    U, Vh = U.to(dtype), Vh.to(dtype)
    b = b.to(dtype) if b is not None else None
    S = code_table(k, r, torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(n, d_in, dtype=torch.float64).to(dtype)
    g = torch.randn(n, d_out, dtype=torch.float64).to(dtype)
    index = torch.randint(0, codes if codes is not None else k, (n,))
    return x, U, S, Vh, b, index, g


# (N, d_in, d_out, r, K, codes used): N = 1, odd sizes, truncated rank, K = 1 with several row chunks,
# codes with more rows than one chunk (64), codes 3..7 unused, no bias
SHAPES = [
    (1, 13, 29, 13, 1, None),
    (7, 24, 9, 9, 5, None),
    (150, 17, 31, 6, 1, None),
    (203, 17, 31, 6, 4, None),
    (190, 33, 20, 20, 8, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,d_in,d_out,r,k,codes", SHAPES)
def test_ops_match_per_code_loop(dtype, n, d_in, d_out, r, k, codes):
    x, U, S, Vh, b, index, g = _problem(n, d_in, d_out, r, k, dtype, codes, bias=(n != 7))
    y_ref, _, dx_ref, dS_ref = per_code_oracle(x, U, S, Vh, b, g, index)
    tol_y, tol_ds = TOL[dtype]
    y, h = _ops().indexed_forward(x, U, S, Vh, b, index, True)
    assert y.shape == (n, d_out) and y.dtype == dtype and h.shape == (n, r) and h.dtype == dtype
    assert torch.equal(h, x @ Vh.t())  # h is the plain GEMM, saved unscaled
    assert _rel(y, y_ref) <= tol_y
    y2, empty = _ops().indexed_forward(x, U, S, Vh, b, index, False)
    assert torch.equal(y2, y) and empty.numel() == 0
    dx, dS = _ops().indexed_backward(g, h, U, S, Vh, index, True)
    assert dx.shape == (n, d_in) and dx.dtype == dtype and dS.shape == (k, r) and dS.dtype == S.dtype
    assert _rel(dx, dx_ref) <= tol_y
    assert _rel(dS, dS_ref) <= tol_ds
    unused = sorted(set(range(k)) - set(index.tolist()))
    if unused:
        assert torch.equal(dS[unused], torch.zeros(len(unused), r, dtype=S.dtype))
    no_dx, dS2 = _ops().indexed_backward(g, h, U, S, Vh, index, False)
    assert no_dx.numel() == 0 and torch.equal(dS2, dS)
    assert torch.equal(_ops().indexed_input_grad(g, U, S, Vh, index), dx)


def test_low_precision_float16():
    x, U, S, Vh, b, index, g = _problem(37, 20, 12, 8, 3, torch.float16)
    y_ref, _, dx_ref, dS_ref = per_code_oracle(x, U, S, Vh, b, g, index)
    y, h = _ops().indexed_forward(x, U, S, Vh, b, index, True)
    dx, dS = _ops().indexed_backward(g, h, U, S, Vh, index, True)
    assert y.dtype == dx.dtype == torch.float16 and dS.dtype == torch.float32
    assert _rel(y, y_ref) < 3e-2 and _rel(dx, dx_ref) < 3e-2 and _rel(dS, dS_ref) < 3e-2


def test_float64_table_with_float32_inputs():
    """S may be float64 for float32 inputs: the scale runs in float32 (the accumulation type) and dS
    comes back in S's dtype."""
    x, U, S, Vh, b, index, g = _problem(20, 10, 8, 5, 3, torch.float32)
    S64 = S.double()
    y_ref, _, dx_ref, dS_ref = per_code_oracle(x, U, S64, Vh, b, g, index)
    y, h = _ops().indexed_forward(x, U, S64, Vh, b, index, True)
    dx, dS = _ops().indexed_backward(g, h, U, S64, Vh, index, True)
    assert y.dtype == torch.float32 and dS.dtype == torch.float64
    assert _rel(y, y_ref) <= 1e-5 and _rel(dx, dx_ref) <= 1e-5 and _rel(dS, dS_ref) <= 1e-4


def test_no_rows():
    x, U, S, Vh, b, index, g = _problem(0, 10, 8, 5, 3, torch.float32)
    y, h = _ops().indexed_forward(x, U, S, Vh, b, index, True)
    assert y.shape == (0, 8) and h.shape == (0, 5)
    dx, dS = _ops().indexed_backward(g, h, U, S, Vh, index, True)
    assert dx.shape == (0, 10) and torch.equal(dS, torch.zeros(3, 5))
    assert _ops().indexed_input_grad(g, U, S, Vh, index).shape == (0, 10)


def test_non_contiguous_inputs():
    x, U, S, Vh, b, index, g = _problem(90, 14, 11, 7, 4, torch.float32)
    y_ref, _, dx_ref, dS_ref = per_code_oracle(x, U, S, Vh, b, g, index)
    nc = {
        "x": torch.stack([x, x], 2)[..., 0],
        "U": U.t().contiguous().t(),
        "S": S.t().contiguous().t(),
        "Vh": Vh.t().contiguous().t(),
        "b": torch.stack([b, b], 1)[:, 0],
        "index": torch.stack([index, index], 1)[:, 0],
        "g": torch.stack([g, g], 1)[:, 0],
    }
    assert not any(t.is_contiguous() for t in nc.values())
    y, h = _ops().indexed_forward(nc["x"], nc["U"], nc["S"], nc["Vh"], nc["b"], nc["index"], True)
    assert _rel(y, y_ref) <= 1e-5
    h_nc = torch.stack([h, h], 2)[..., 0]
    dx, dS = _ops().indexed_backward(nc["g"], h_nc, nc["U"], nc["S"], nc["Vh"], nc["index"], True)
    assert _rel(dx, dx_ref) <= 1e-5 and _rel(dS, dS_ref) <= 1e-4
    dx2 = _ops().indexed_input_grad(nc["g"], nc["U"], nc["S"], nc["Vh"], nc["index"])
    assert _rel(dx2, dx_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype):
    """dS is bitwise equal on repeat and for any number of threads; y and dx (ATen GEMMs around the
    fused gather-scale) on repeat."""
    x, U, S, Vh, b, index, g = _problem(3001, 40, 36, 32, 5, dtype, seed=3)
    index[index == 4] = 0  # one heavy code, one unused
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4, 1):
            torch.set_num_threads(threads)
            for _ in range(2):
                y, h = _ops().indexed_forward(x, U, S, Vh, b, index, True)
                dx, dS = _ops().indexed_backward(g, h, U, S, Vh, index, True)
                results.append((threads, y, dx, dS))
    finally:
        torch.set_num_threads(old)
    dS0 = results[0][3]
    for threads, _, _, dS in results[1:]:
        assert torch.equal(dS, dS0), f"dS differs with {threads} threads"
    for (t1, y1, dx1, _), (t2, y2, dx2, _) in zip(results[::2], results[1::2]):
        assert t1 == t2 and torch.equal(y1, y2) and torch.equal(dx1, dx2), f"repeat differs with {t1} threads"
    assert torch.equal(dS0[4], torch.zeros(32))


def _fixed_order_segment_sum(h, t, index, k, chunk=64):
    """The documented order of the C++ reduction, replayed in float32: per code, its rows in increasing
    n cut into chunks of 64, each summed row by row from zero, then the chunk sums added in order."""
    h, t = h.float(), t.float()
    out = torch.zeros(k, h.shape[1])
    for c in range(k):
        rows = (index == c).nonzero().flatten().tolist()
        total = torch.zeros(h.shape[1])
        for i in range(0, len(rows), chunk):
            p = torch.zeros(h.shape[1])
            for n in rows[i:i + chunk]:
                p = p + h[n] * t[n]
            total = total + p
        out[c] = total
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ds_reduction_order_is_fixed(dtype):
    """With U = I (so t = grad exactly, whatever the GEMM's blocking), dS equals the fixed-order sum
    replayed in Python bitwise, for every thread count: the order does not depend on the schedule."""
    torch.manual_seed(5)
    n, r, k = 517, 24, 6
    U = torch.eye(r, dtype=dtype)
    Vh = torch.randn(r, 10, dtype=torch.float64).to(dtype)
    S = code_table(k, r)
    h = torch.randn(n, r, dtype=torch.float64).to(dtype)
    g = torch.randn(n, r, dtype=torch.float64).to(dtype)
    index = torch.randint(0, k - 1, (n,))  # code k-1 unused
    index[:300] = 2  # one code with several chunks
    want = _fixed_order_segment_sum(h, g, index, k)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            _, dS = _ops().indexed_backward(g, h, U, S, Vh, index, True)
            assert torch.equal(dS, want), f"{threads} threads"
    finally:
        torch.set_num_threads(old)


def test_bad_inputs_fail_clearly():
    x, U, S, Vh, b, index, g = _problem(6, 10, 8, 5, 3, torch.float32)
    h = x @ Vh.t()
    fwd, bwd, igrad = _ops().indexed_forward, _ops().indexed_backward, _ops().indexed_input_grad
    cases = [
        (lambda: fwd(x, U, S, Vh, b, index.int(), True), "indexed_forward: index must be int64, got Int"),
        (lambda: fwd(x, U, S, Vh, b, index[:5], True), r"indexed_forward: index must have shape \(N,\) = \(6,\)"),
        (lambda: fwd(x, U, S, Vh, b, index[:, None], True), "index must have shape"),
        (lambda: fwd(x, U, S, Vh, b, torch.tensor([0, 1, 3, 0, 0, 0]), True),
         r"index values must be in \[0, K=3\), got 3 at row 2"),
        (lambda: bwd(g, h, U, S, Vh, torch.tensor([0, -1, 0, 0, 0, 0]), True), r"indexed_backward: index values"),
        (lambda: igrad(g, U, S, Vh, torch.full((6,), 7)), r"indexed_input_grad: index values"),
        (lambda: fwd(x, U, S.bfloat16(), Vh, b, index, True), "S must be float32 or float64, got BFloat16"),
        (lambda: fwd(x, U, S.half(), Vh, b, index, True), "S must be float32 or float64"),
        (lambda: fwd(x, U, S[0], Vh, b, index, True), "S must be 2-D"),
        (lambda: fwd(x, U, code_table(3, 4), Vh, b, index, True), "rank mismatch"),
        (lambda: fwd(x, U.double(), S, Vh, b, index, True), "U and Vh must have x's dtype Float"),
        (lambda: fwd(x[0], U, S, Vh, b, index, True), "x must be 2-D"),
        (lambda: fwd(x.int(), U, S, Vh, b, index, True), "x must be floating point"),
        (lambda: fwd(x[:, :9], U, S, Vh, b, index[:6], True), "x must have 10 columns"),
        (lambda: fwd(x, U, S, Vh, b[:7], index, True), r"bias must be \(8,\)"),
        (lambda: fwd(x, U, S, Vh, b.double(), index, True), "bias must be"),
        (lambda: bwd(g, h[:, :4], U, S, Vh, index, True), r"indexed_backward: h must be \(6, 5\)"),
        (lambda: bwd(g, h.double(), U, S, Vh, index, True), "h must be"),
        (lambda: bwd(g[:, :7], h, U, S, Vh, index, True), "grad must have 8 columns"),
        (lambda: igrad(g, U, S, Vh.double(), index), "U and Vh must have grad's dtype"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


# --------------------------------------------------------------------------------------------
# Through spectral_linear

class _Recorder:
    """Forwards to torch.ops.imse_ext and records which ops are called."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(torch.ops.imse_ext, name)


@pytest.mark.parametrize("need_ds", [True, False])
def test_spectral_linear_uses_the_cpu_ops(monkeypatch, need_ds):
    from imse_kernels.backends.base import SpectralBackend
    from imse_kernels.backends.compiled_backend import CpuBackend, CudaBackend

    assert hasattr(torch.ops.imse_ext, "indexed_forward")
    # both compiled flavours call the imse_ext ops (CUDA kernels are registered by _C_cuda)
    for name in ("indexed_forward", "indexed_backward", "indexed_input_grad"):
        assert getattr(CudaBackend, name) is getattr(CpuBackend, name) is not getattr(SpectralBackend, name)

    U, _, Vh, b = factors(24, 18, 12)
    S0 = code_table(4, 12)
    x0 = torch.randn(3, 5, 24)
    index = torch.tensor([2, 0, 2])
    out = {}
    for backend in ("torch", "cpu"):
        rec = _Recorder()
        if backend == "cpu":
            monkeypatch.setattr(CpuBackend, "_ops", property(lambda self, rec=rec: rec))
        S = S0.clone().requires_grad_(need_ds)
        x = x0.clone().requires_grad_(True)
        with use_backend(backend):
            y = spectral_linear(x, U, S, Vh, b, index=index)
            y.backward(torch.ones_like(y))
        out[backend] = (y.detach(), x.grad, S.grad)
        if backend == "cpu":
            want = ["indexed_forward", "indexed_backward"] if need_ds else ["indexed_forward", "indexed_input_grad"]
            assert rec.calls == want
    (y_t, dx_t, dS_t), (y_c, dx_c, dS_c) = out["torch"], out["cpu"]
    torch.testing.assert_close(y_c, y_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_c, dx_t, rtol=1e-6, atol=1e-6)
    if need_ds:
        torch.testing.assert_close(dS_c, dS_t, rtol=1e-5, atol=1e-5)
        assert torch.equal(dS_c[[1, 3]], torch.zeros(2, 12))
    else:
        assert dS_c is None and dS_t is None
