"""The `triton` backend behind `spectral_linear`, on the CPU through the interpreter: every primitive
and variant against the torch backend, the public op with autograd on both routes, torch.compile,
the tuner's choice logic, and clear errors."""
import json

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, oracle_backward, oracle_forward, spectral_inputs  # noqa: E402

from imse_kernels import spectral_linear, use_backend  # noqa: E402
from imse_kernels.backends import get_backend, unavailable_reason  # noqa: E402
from imse_kernels.backends.triton_backend import TritonBackend  # noqa: E402
from imse_kernels.ops.planner import FACTORIZED, RECOMPOSED, plan  # noqa: E402
from imse_kernels.triton_kernels import runtime, tuning  # noqa: E402

pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None or not runtime.INTERPRETED,
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VARIANTS = ["fused", "split"]


@pytest.fixture
def tb():
    return get_backend("triton")


@pytest.fixture
def ref():
    return get_backend("torch")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save_h", [False, True])
def test_factorized_forward(tb, ref, variant, dtype, save_h):
    x, U, s, Vh, b = spectral_inputs(19, 37, 26, 21, dtype)
    with tuning.force(variant):
        y, h = tb.factorized_forward(x, U, s, Vh, b, save_h)
    y_ref, h_ref = ref.factorized_forward(x, U, s, Vh, b, save_h)
    y64, h64 = oracle_forward(x, U, s, Vh, b)
    assert y.dtype == dtype
    assert_close(y, y64, y_ref, "y")
    assert (h is None) == (not save_h)
    if save_h:
        assert_close(h, h64, h_ref, "h")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_dx", [False, True])
def test_factorized_backward(tb, ref, variant, dtype, need_dx):
    x, U, s, Vh, _ = spectral_inputs(19, 37, 26, 21, dtype, bias=False)
    g = torch.randn(19, 26).to(dtype)
    h = x @ Vh.t()
    with tuning.force(variant):
        dx, ds = tb.factorized_backward(g, h, U, s, Vh, need_dx)
    dx_ref, ds_ref = ref.factorized_backward(g, h, U, s, Vh, need_dx)
    dx64, ds64 = oracle_backward(g, h, U, s, Vh)
    assert ds.dtype == s.dtype
    assert_close(ds, ds64, ds_ref, "ds", dtype)
    assert (dx is None) == (not need_dx)
    if need_dx:
        assert_close(dx, dx64, dx_ref, "dx")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factorized_input_grad(tb, ref, variant, dtype):
    _, U, s, Vh, _ = spectral_inputs(1, 37, 26, 21, dtype, bias=False)
    g = torch.randn(1, 26).to(dtype)  # N = 1
    with tuning.force(variant):
        dx = tb.factorized_input_grad(g, U, s, Vh)
    assert_close(dx, oracle_backward(g, torch.zeros(1, 21), U, s, Vh)[0], ref.factorized_input_grad(g, U, s, Vh), "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_recompose_and_recomposed_backward(tb, ref, dtype):
    x, U, s, Vh, _ = spectral_inputs(23, 37, 26, 21, dtype, bias=False)
    W = tb.recompose(U, s, Vh)
    W64 = (U.double() * s.double()) @ Vh.double()
    assert_close(W, W64, ref.recompose(U, s, Vh), "W")
    g = torch.randn(23, 26).to(dtype)
    dx, ds = tb.recomposed_backward(g, x, U, s, Vh, W, True)
    dx_ref, ds_ref = ref.recomposed_backward(g, x, U, s, Vh, W, True)
    assert_close(dx, g.double() @ W.double(), dx_ref, "dx")
    ds64 = ((U.double().t() @ (g.double().t() @ x.double())) * Vh.double()).sum(1)
    assert_close(ds, ds64, ds_ref, "ds", dtype)
    none, ds2 = tb.recomposed_backward(g, x, U, s, Vh, W, False)
    assert none is None and torch.equal(ds, ds2)


def test_float64_runs_through_torch_backend(tb):
    x, U, s, Vh, b = spectral_inputs(5, 12, 10, 8, torch.float64)
    y, h = tb.factorized_forward(x, U, s.double(), Vh, b, True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, oracle_forward(x, U, s, Vh, b)[0])


def test_backend_rejects_bad_operands(tb):
    x, U, s, Vh, b = spectral_inputs(5, 20, 18, 16, torch.float32)
    with pytest.raises(ValueError, match="s must be a floating 1-D tensor of length r=16"):
        tb.factorized_forward(x, U, s[:3], Vh, b, False)
    with pytest.raises(TypeError, match="share one dtype"):
        tb.factorized_forward(x, U.half(), s, Vh, b, False)
    with pytest.raises(ValueError, match=r"h must be \(5, 16\)"):
        tb.factorized_backward(torch.randn(5, 18), torch.randn(5, 15), U, s, Vh, True)


# ------------------------------------------------------------------------------------------
# The public op on this backend

def _grads(backend, x, U, s, Vh, b):
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    with use_backend(backend):
        y = spectral_linear(x, U, s, Vh, b)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, s.grad


@pytest.mark.parametrize("shape,r,route", [
    ((2, 3, 24), 12, FACTORIZED),   # 3-D input, truncated rank: route F
    ((1, 24), 12, FACTORIZED),      # N = 1
    ((300, 24), 20, RECOMPOSED),    # large N, full rank: route R
])
@pytest.mark.parametrize("bias", [True, False])
def test_spectral_linear_autograd_matches_torch_backend(shape, r, route, bias):
    d_in, d_out = 24, 20
    _, U, s, Vh, b = spectral_inputs(1, d_in, d_out, r, torch.float32, bias=bias)
    x = torch.randn(*shape)
    n = x.numel() // d_in
    assert plan(n, d_in, d_out, r, True, True, False).route == route
    y_t, gx_t, gs_t = _grads("triton", x, U, s, Vh, b)
    y_r, gx_r, gs_r = _grads("torch", x, U, s, Vh, b)
    assert y_t.shape == (*shape[:-1], d_out)
    torch.testing.assert_close(y_t, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs_t, gs_r, rtol=1e-5, atol=1e-4)


def test_spectral_linear_noncontiguous_input_bf16():
    _, U, s, Vh, b = spectral_inputs(1, 24, 20, 12, torch.bfloat16)
    x = torch.randn(24, 9).to(torch.bfloat16).t()  # non-contiguous (9, 24)
    with use_backend("triton"):
        y = spectral_linear(x, U, s, Vh, b)
    assert_close(y, oracle_forward(x, U, s, Vh, b)[0], spectral_linear(x, U, s, Vh, b), "y")


def test_torch_compile_fullgraph_runs_the_triton_kernels(monkeypatch):
    """fullgraph capture succeeds, and the compiled call really goes through this backend."""
    calls = []
    for name in ("factorized_forward", "factorized_backward"):
        orig = getattr(TritonBackend, name)

        def spy(self, *a, _orig=orig, _name=name):
            calls.append(_name)
            return _orig(self, *a)
        monkeypatch.setattr(TritonBackend, name, spy)
    _, U, s, Vh, b = spectral_inputs(1, 24, 20, 12, torch.float32)
    x = torch.randn(2, 5, 24, requires_grad=True)
    s = s.clone().requires_grad_()
    torch._dynamo.reset()
    f = torch.compile(lambda x, s: spectral_linear(x, U, s, Vh, b), fullgraph=True, backend="aot_eager")
    with use_backend("triton"):
        f(x, s).square().sum().backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    with use_backend("torch"):
        spectral_linear(x, U, s, Vh, b).square().sum().backward()
    assert calls == ["factorized_forward", "factorized_backward"]
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs, s.grad, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Tuner logic (the timing itself needs a GPU; here do_bench is replaced by fixed times)

def test_tuner_picks_fastest_caches_and_persists(monkeypatch, tmp_path):
    import triton.testing

    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []
    fns = {n: (lambda n=n: n) for n in times}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (timed.append(fn()), times[fn()])[1])
    monkeypatch.setattr(tuning, "enabled", lambda device: True)
    path = tmp_path / "choices.json"
    monkeypatch.setenv("IMSE_TRITON_CACHE", str(path))
    monkeypatch.setattr(tuning, "_loaded", False)
    monkeypatch.setattr(tuning, "_choices", {})
    assert tuning.choose("k1", torch.device("cpu"), fns, "a") == "b"
    assert sorted(timed) == ["a", "b", "c"]
    assert tuning.choose("k1", torch.device("cpu"), fns, "a") == "b"
    assert len(timed) == 3  # cached: not timed again
    assert json.loads(path.read_text()) == {"k1": "b"}
    monkeypatch.setattr(tuning, "_loaded", False)
    monkeypatch.setattr(tuning, "_choices", {})
    assert tuning.choose("k1", torch.device("cpu"), fns, "a") == "b"  # read back from disk
    assert len(timed) == 3


def test_tuner_default_without_timing_and_forcing():
    fns = {"fused/x": lambda: 0, "split/y": lambda: 1, "blas": lambda: 2}
    assert tuning.choose("no-timing-here", torch.device("cpu"), fns, "fused/x") == "fused/x"
    with tuning.force("split"):
        assert tuning.choose("no-timing-here", torch.device("cpu"), fns, "fused/x") == "split/y"
    with tuning.force("blas"):
        assert tuning.choose("no-timing-here", torch.device("cpu"), fns, "fused/x") == "blas"
    with pytest.raises(KeyError):
        tuning.choose("k", torch.device("cpu"), fns, "missing")
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 197, 12608)] == [1, 1, 2, 4, 256, 16384]


def test_measured_route_off_on_cpu_and_picks_faster_when_timed(tb, monkeypatch):
    assert tb.measured_route(64, 24, 20, 20, True, True, False, torch.float32, torch.device("cpu")) is None
    import triton.testing

    monkeypatch.setattr(tuning, "enabled", lambda device: True)
    monkeypatch.setattr(tuning, "_choices", {})
    monkeypatch.setattr(tuning, "_loaded", True)
    monkeypatch.delenv("IMSE_TRITON_CACHE", raising=False)
    ran = []

    def fake_bench(fn, **kw):
        fn()
        ran.append(getattr(fn, "__name__", ""))
        return 1.0 if fn.__name__ == "route_r" else 2.0
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    route = tb.measured_route(40, 24, 20, 20, True, True, False, torch.float32, torch.device("cpu"))
    assert route == RECOMPOSED and {"route_f", "route_r"} <= set(ran)
    assert any(k.startswith("route|") for k in tuning.choices())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", ["ds_dx", "dx", "ds"])
def test_per_sample_codes_match_torch_backend(dtype, need):
    """index=: the chain kernel's gathered scale and per-code ds partials against the ATen default."""
    _, U, _, Vh, b = spectral_inputs(1, 37, 26, 21, dtype)
    S = torch.rand(4, 21) + 0.5
    x = torch.randn(3, 5, 37).to(dtype)
    index = torch.tensor([3, 0, 3])
    results = {}
    for backend in ("triton", "torch"):
        xr = x.clone().requires_grad_(need != "ds")
        Sr = S.clone().requires_grad_(need != "dx")
        with use_backend(backend):
            y = spectral_linear(xr, U, Sr, Vh, b, index=index)
            y.float().square().sum().backward()
        results[backend] = (y, xr.grad, Sr.grad)
    (y, dx, dS), (y_ref, dx_ref, dS_ref) = results["triton"], results["torch"]
    rel = 3e-2 if dtype == torch.bfloat16 else 1e-5

    def close(a, b):  # relative to the largest entry: bf16 rounds each backend's intermediates differently
        assert (a.float() - b.float()).abs().max() <= rel * b.float().abs().max()

    close(y, y_ref)
    if need != "ds":
        close(dx, dx_ref)
    if need != "dx":
        assert dS.shape == (4, 21) and torch.equal(dS[[1, 2]], torch.zeros(2, 21))
        close(dS, dS_ref)
