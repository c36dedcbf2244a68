"""bf16 on the CPU (docs/design.md §14): the op and the layer under CPU autocast against a float64 oracle,
the per-version cache of the low-precision factors and W', and the behaviour on a CPU without native bf16
(the capability check patched). One IMSE step against float64: tests/tta/test_bf16_cpu_adapters.py.

Bounds (relative error = max |error| / max |reference|; the oracle in float64 on the inputs rounded the way
autocast rounds them: x, U, Vh and bias to bf16, s exact): y, dx and ds 1e-2, for both CPU backends and
routes (measured at most 4.8e-3 for y, 4.9e-3 for dx, 3.8e-3 for ds, including ViT-S shapes at N = 1576:
h, h ⊙ s and the output are each rounded to bf16 once, 2^-9 each; ds accumulates in float32)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_backends, factors, rel_err
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import imse_kernels
from imse_kernels import FusedSpectralLinear, precision, spectral_linear, use_backend
from imse_kernels.ops import force_route
from imse_kernels.ops.weight_cache import RecomposedWeightCache

BF16 = torch.bfloat16
CPU_BACKENDS = cpu_backends()
# (lead shape, d_in, d_out, r): N = 1, odd sizes, truncated rank, 3-D and 4-D x, N above a 64-row chunk
SHAPES = [((1,), 13, 29, 13), ((7,), 24, 9, 9), ((3, 5), 17, 31, 6), ((2, 3, 4), 33, 20, 20), ((130,), 40, 40, 40)]
TOL_Y = TOL_DS = 1e-2

native_bf16 = pytest.mark.skipif(not precision.cpu_native_dtype(BF16),
                                 reason="this CPU has no native bf16 (the slow-CPU tests patch the check instead)")


def bf16_oracle(x, U, s, Vh, b):
    """float64 y on the inputs as autocast rounds them (x, U, Vh, bias in bf16; s exact), differentiable in x, s."""
    def r(t):
        return t.detach().to(BF16).double()

    x64 = r(x).requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True)
    y = ((x64 @ r(Vh).t()) * s64) @ r(U).t() + (r(b) if b is not None else 0)
    return y, x64, s64


class CountCasts(TorchDispatchMode):
    """Counts `_to_copy` calls on tensors of the given shapes (the factors), e.g. a per-call cast of U."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = {tuple(s) for s in shapes}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and tuple(args[0].shape) in self.shapes:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------------
# The op

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", ["factorized", "recomposed"])
@pytest.mark.parametrize("lead,d_in,d_out,r", SHAPES)
@pytest.mark.parametrize("cached", [False, True])
def test_op_under_autocast_matches_float64_oracle(backend, route, lead, d_in, d_out, r, cached):
    U, s, Vh, b = factors(d_in, d_out, r)
    x = torch.randn(*lead, d_in, requires_grad=True)
    s.requires_grad_(True)
    cache = RecomposedWeightCache() if cached else None
    with use_backend(backend), force_route(route), torch.autocast("cpu", BF16):
        y = spectral_linear(x, U, s, Vh, b, weight_cache=cache)
    assert y.dtype == BF16 and y.shape == (*lead, d_out)
    g = torch.randn_like(y)
    y.backward(g)
    y64, x64, s64 = bf16_oracle(x, U, s, Vh, b)
    y64.backward(g.double())
    assert rel_err(y, y64) < TOL_Y
    assert x.grad.dtype == torch.float32 and rel_err(x.grad, x64.grad) < TOL_Y
    assert s.grad.dtype == torch.float32 and rel_err(s.grad, s64.grad) < TOL_DS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", ["factorized", "recomposed"])
def test_op_bf16_inputs_non_contiguous(backend, route):
    """bf16 tensors passed directly (no autocast), x and the factors non-contiguous, s float32."""
    U, s, Vh, b = factors(37, 23, 19)
    U, Vh, b = (t.to(BF16) for t in (U, Vh, b))
    U_nc, Vh_nc = U.t().contiguous().t(), Vh.t().contiguous().t()
    assert not U_nc.is_contiguous() and not Vh_nc.is_contiguous()
    x = torch.randn(11, 2 * 37).to(BF16)[:, ::2].requires_grad_(True)
    s.requires_grad_(True)
    with use_backend(backend), force_route(route):
        y = spectral_linear(x, U_nc, s, Vh_nc, b)
    g = torch.randn_like(y)
    y.backward(g)
    y64, x64, s64 = bf16_oracle(x, U, s, Vh, b)
    y64.backward(g.double())
    assert rel_err(y, y64) < TOL_Y and rel_err(x.grad, x64.grad) < TOL_Y and rel_err(s.grad, s64.grad) < TOL_DS


def test_cpu_backend_ds_accumulates_in_float32():
    """ds over many rows: bf16 partial sums would lose ~log2(N)·2^-9; the C++ reductions accumulate in
    float32, so the error stays at the inputs' rounding. Checked on both routes' reductions."""
    if "cpu" not in imse_kernels.available_backends():
        pytest.skip("no C++ CPU extension")
    ops = torch.ops.imse_ext
    n, d, r = 4096, 48, 48
    h = (torch.rand(n, r) + 0.5).to(BF16)  # positive: no cancellation, the sum grows with n
    grad = (torch.rand(n, d) + 0.5).to(BF16)
    U = torch.eye(d, r).to(BF16)
    Vh = torch.eye(r, d).to(BF16)
    s = torch.ones(r)
    _, ds = ops.factorized_backward(grad, h, U, s, Vh, False)
    ref = (h.double() * (grad.double() @ U.double())).sum(0)
    assert ds.dtype == torch.float32 and rel_err(ds, ref) < 1e-5
    x = (torch.rand(n, d) + 0.5).to(BF16)
    W = (U.float() @ Vh.float()).to(BF16)
    _, ds_r = ops.recomposed_backward(grad, x, U, s, Vh, W, False)
    ref_r = ((U.double().t() @ (grad.double().t() @ x.double())) * Vh.double()).sum(1)
    assert ds_r.dtype == torch.float32 and rel_err(ds_r, ref_r) < 1e-2  # G and M = UᵀG rounded to bf16 once each


# ----------------------------------------------------------------------------------------------------
# The layer and its cache

def make_layer(d_in=40, d_out=56, rank=None, bias=True):
    torch.manual_seed(0)
    return FusedSpectralLinear.from_linear(nn.Linear(d_in, d_out, bias=bias), rank=rank)


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("rank", [None, 17])
@pytest.mark.parametrize("lead", [(1,), (3, 9), (2, 2, 5)])
def test_layer_under_autocast_matches_float64_oracle(trained, rank, lead):
    layer = make_layer(rank=rank)
    layer.s.requires_grad_(trained)
    x = torch.randn(*lead, 40, requires_grad=True)
    with torch.autocast("cpu", BF16):
        y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y64, x64, s64 = bf16_oracle(x, layer.U, layer.s, layer.Vh, layer.bias)
    y64.backward(g.double())
    # a frozen layer runs x·W'ᵀ with W' recomposed in float32 and rounded once: the oracle's bf16 factors
    # are one more rounding away from it, so the bound is the same
    assert y.dtype == BF16 and rel_err(y, y64) < TOL_Y and rel_err(x.grad, x64.grad) < TOL_Y
    if trained:
        assert layer.s.grad.dtype == torch.float32 and rel_err(layer.s.grad, s64.grad) < TOL_DS
    else:
        assert layer.s.grad is None


def test_frozen_w_is_recomposed_in_float32_and_rounded_once():
    """Under autocast a frozen layer's bf16 W' is (U ⊙ s)·Vh recomposed with autocast off, then rounded: it
    equals the float64 product rounded to bf16 but for ties at a rounding boundary (at most one ulp)."""
    torch.manual_seed(0)
    layer = FusedSpectralLinear.from_linear(nn.Linear(96, 80))
    layer.s.requires_grad_(False)
    with torch.autocast("cpu", BF16), torch.no_grad():
        layer(torch.randn(4, 96))
    W = layer._weight_cache.lookup(layer.U, layer.s, layer.Vh, BF16)
    ref = ((layer.U.double() * layer.s.double()) @ layer.Vh.double()).to(BF16)
    ulp = torch.finfo(BF16).eps * ref.double().abs()  # one ulp (a lower bound) at each entry's magnitude
    assert W is not None and W.dtype == BF16
    assert ((W.double() - ref.double()).abs() <= ulp).all()  # recomposed in bf16 it is off by up to 8 ulps


def test_tapped_layer_under_autocast_gives_h_and_matches_oracle():
    """The probe's tap under autocast gets h from the cached bf16 Vh (no per-call cast), frozen r < d_in too."""
    for d_in, d_out, frozen in ((64, 24, True), (24, 40, True), (24, 40, False)):
        layer = make_layer(d_in, d_out)
        layer.s.requires_grad_(not frozen)
        seen = []
        layer.factor_tap = lambda rows, h, seen=seen: seen.append(h)
        x = torch.randn(2, 5, d_in, requires_grad=True)
        with torch.autocast("cpu", BF16):
            y = layer(x)
        y64, _, _ = bf16_oracle(x, layer.U, layer.s, layer.Vh, layer.bias)
        assert rel_err(y, y64) < TOL_Y
        h64 = x.detach().to(BF16).double().reshape(-1, d_in) @ layer.Vh.to(BF16).double().t()
        assert seen[0] is not None and seen[0].dtype == BF16 and rel_err(seen[0], h64) < TOL_Y
        with CountCasts([layer.U.shape, layer.Vh.shape]) as casts, torch.autocast("cpu", BF16):
            layer(x).float().sum().backward()
        assert casts.count == 0


@pytest.mark.parametrize("trained", [True, False])
def test_autocast_casts_the_factors_once_per_version(trained):
    """Second and later calls under autocast cast neither U nor Vh nor the bias nor W'."""
    layer = make_layer()
    layer.s.requires_grad_(trained)
    x = torch.randn(6, 40, requires_grad=True)
    with torch.autocast("cpu", BF16):
        layer(x).float().sum().backward()
    misses = layer._weight_cache.misses, layer._weight_cache.cast_misses
    shapes = [layer.U.shape, layer.Vh.shape, layer.bias.shape, (56, 40)]
    with CountCasts(shapes) as casts, torch.autocast("cpu", BF16):
        for _ in range(3):
            layer(x).float().sum().backward()
    assert casts.count == 0
    assert (layer._weight_cache.misses, layer._weight_cache.cast_misses) == misses
    cached = layer._weight_cache.tensors()
    assert cached and all(t.dtype == BF16 and t.is_contiguous() for t in cached)


def test_the_cast_counter_sees_per_call_casts():
    """The counter above can fail: the op without a layer's cache casts U and Vh on every call."""
    U, s, Vh, b = factors(40, 56, 40)
    with CountCasts([U.shape, Vh.shape]) as casts, torch.autocast("cpu", BF16):
        spectral_linear(torch.randn(6, 40), U, s, Vh, b)
        spectral_linear(torch.randn(6, 40), U, s, Vh, b)
    assert casts.count == 4


def check_frozen_output(layer, x):
    with torch.autocast("cpu", BF16), torch.no_grad():
        y = layer(x)
    y64, _, _ = bf16_oracle(x, layer.U, layer.s, layer.Vh, layer.bias)
    assert rel_err(y, y64) < TOL_Y


def test_cache_is_rebuilt_after_every_in_place_update_of_s():
    """A frozen layer under autocast uses the cached bf16 W'; every in-place change of s (optimizer step,
    mul_, copy_, load_state_dict) must rebuild it, or the output would be silently stale."""
    layer = make_layer()
    layer.s.requires_grad_(False)
    x = torch.randn(9, 40)
    opt = torch.optim.SGD([layer.s], lr=0.5)
    check_frozen_output(layer, x)

    def sgd_step():
        layer.s.grad = torch.randn_like(layer.s)
        opt.step()

    updates = [lambda: layer.s.mul_(1.5), lambda: layer.s.copy_(torch.linspace(0.1, 2.0, layer.s.numel())),
               lambda: layer.s.add_(1.0),
               lambda: layer.load_state_dict({**layer.state_dict(), "s": torch.rand(layer.s.numel()) + 0.2}),
               sgd_step]
    for i, update in enumerate(updates):
        before = layer._weight_cache.misses
        with torch.no_grad():
            update()
        check_frozen_output(layer, x)
        assert layer._weight_cache.misses == before + 1, f"update {i} did not rebuild W'"


def test_a_stale_cache_would_be_caught(monkeypatch):
    """The check above can fail: with a cache key blind to s's version the output goes stale."""
    from imse_kernels.ops import weight_cache

    key = weight_cache._weight_key
    monkeypatch.setattr(weight_cache, "_weight_key", lambda U, s, Vh: key(U, s.detach().clone(), Vh)[:5])
    layer = make_layer()
    layer.s.requires_grad_(False)
    x = torch.randn(9, 40)
    check_frozen_output(layer, x)
    with torch.no_grad():
        layer.s.mul_(1.5)
    with pytest.raises(AssertionError):
        check_frozen_output(layer, x)


def test_cache_is_rebuilt_after_an_update_of_U_Vh_or_the_bias():
    layer = make_layer()
    layer.s.requires_grad_(True)  # the factorized/recomposed op path: cast factors, not W'
    x = torch.randn(4, 40)
    for name in ("U", "Vh", "bias"):
        with torch.no_grad():
            getattr(layer, name).mul_(-0.5)
        with torch.autocast("cpu", BF16):
            y = layer(x)
        y64, _, _ = bf16_oracle(x, layer.U, layer.s, layer.Vh, layer.bias)
        assert rel_err(y, y64) < TOL_Y, name
    layer.s.requires_grad_(False)
    with torch.no_grad():
        layer.U.mul_(2.0)
        with torch.autocast("cpu", BF16):
            y = layer(x)
    y64, _, _ = bf16_oracle(x, layer.U, layer.s, layer.Vh, layer.bias)
    assert rel_err(y, y64) < TOL_Y


def test_cache_follows_a_dtype_change():
    """bf16 then fp16 autocast keep separate entries; `.double()` of the layer invalidates everything."""
    layer = make_layer()
    layer.s.requires_grad_(False)
    x = torch.randn(5, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 is emulated on most CPUs: warned, tested elsewhere
        for dt in (BF16, torch.float16, BF16):
            with torch.autocast("cpu", dt), torch.no_grad():
                y = layer(x)
            assert y.dtype == dt
            ref = F.linear(x.to(dt).double(), layer.weight.double(), layer.bias.to(dt).double())
            assert rel_err(y, ref) < TOL_Y
    assert {t.dtype for t in layer._weight_cache.tensors()} >= {BF16, torch.float16}
    layer.double()
    with torch.no_grad():
        y = layer(x.double())
    assert y.dtype == torch.float64
    ref = F.linear(x.double(), (layer.U * layer.s.double()) @ layer.Vh, layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_trainable_bias_under_autocast_gets_its_gradient():
    torch.manual_seed(1)
    layer = FusedSpectralLinear.from_linear(nn.Linear(16, 12), trainable_bias=True)
    x = torch.randn(7, 16)
    for trained_s in (True, False):
        layer.s.requires_grad_(trained_s)
        layer.bias.grad = None
        with torch.autocast("cpu", BF16):
            y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert layer.bias.grad is not None and layer.bias.grad.dtype == torch.float32
        assert rel_err(layer.bias.grad, g.double().sum(0)) < TOL_Y


def test_codes_under_autocast_use_the_cached_factors():
    from imse_kernels import stream_codes

    layer = make_layer()
    layer.enable_codes(3)
    with torch.no_grad():
        layer.codes.mul_(torch.tensor([[1.0], [0.5], [2.0]]))
    x = torch.randn(3, 4, 40)
    index = torch.tensor([2, 0, 1])
    model = nn.Sequential(layer)
    seen = []
    layer.factor_tap = lambda rows, h: seen.append(h)  # MultiStreamIMSE's probe: h from the cached bf16 Vh
    with stream_codes(model, index), torch.autocast("cpu", BF16):
        model(x)  # warm the cache
        with CountCasts([layer.U.shape, layer.Vh.shape]) as casts:
            y = model(x)
    assert casts.count == 0 and y.dtype == BF16
    h64 = x.to(BF16).double().reshape(-1, 40) @ layer.Vh.to(BF16).double().t()
    assert seen[-1] is not None and seen[-1].dtype == BF16 and rel_err(seen[-1], h64) < TOL_Y
    for b in range(3):
        y64, _, _ = bf16_oracle(x[b], layer.U, layer.codes[index[b]], layer.Vh, layer.bias)
        assert rel_err(y[b], y64) < TOL_Y


# ----------------------------------------------------------------------------------------------------
# A CPU without native bf16

@pytest.fixture
def no_native_bf16(monkeypatch):
    """Pretend this CPU has no native bf16 (as an AVX2-only CPU): patch the capability check."""
    monkeypatch.setattr(precision, "cpu_native_dtype", lambda dtype: dtype in (torch.float32, torch.float64))
    monkeypatch.setattr(precision, "_checked", set())
    monkeypatch.delenv(precision.ALLOW_SLOW_ENV, raising=False)


def test_check_autocast_refuses_without_native_bf16(no_native_bf16, monkeypatch):
    with pytest.raises(precision.SlowAutocastError, match="no native bf16.*IMSE_ALLOW_SLOW_AUTOCAST=1"):
        precision.check_autocast(torch.device("cpu"), "bf16")
    assert issubclass(precision.SlowAutocastError, ValueError)  # imse-eval reports ValueErrors as usage errors
    precision.check_autocast("cpu", None)  # float32: nothing to say
    precision.check_autocast("cuda", "bf16")  # not the CPU: not this check's business
    monkeypatch.setenv(precision.ALLOW_SLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        precision.check_autocast("cpu", torch.bfloat16)


def test_the_op_warns_once_under_slow_autocast(no_native_bf16):
    layer = make_layer()
    x = torch.randn(3, 40)
    with pytest.warns(RuntimeWarning, match="emulated and run many times slower"), torch.autocast("cpu", BF16):
        y = layer(x)
    assert y.dtype == BF16  # it still runs, and correctly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", BF16):
            layer(x)  # once per process: the second call is silent


def test_no_warning_on_a_native_cpu_or_in_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_native_dtype", lambda dtype: True)
    monkeypatch.setattr(precision, "_checked", set())
    layer = make_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", BF16):
            layer(torch.randn(3, 40))
        layer(torch.randn(3, 40))
        precision.check_autocast("cpu", "bf16")


def test_eval_cli_refuses_amp_bf16_without_native_bf16(no_native_bf16, capsys):
    from imse_kernels.eval.__main__ import main

    assert main(["--amp", "bf16", "--device", "cpu", "--method", "source"]) == 2
    err = capsys.readouterr().err
    assert "autocast bf16 on the CPU refused" in err and "IMSE_ALLOW_SLOW_AUTOCAST=1" in err


def test_python_m_imse_kernels_reports_native_bf16(capsys, monkeypatch):
    from imse_kernels.__main__ import main

    main()
    out = capsys.readouterr().out
    assert f"bf16 {'native' if precision.cpu_native_dtype(BF16) else 'NOT native'}" in out
    monkeypatch.setattr(precision, "cpu_native_dtype", lambda dtype: False)
    assert "bf16 NOT native" in precision.cpu_precision_report()


# ----------------------------------------------------------------------------------------------------
# precision.autocast: torch.autocast with the CPU policy (attention in fp32 where bf16 attention is slower)

def sdpa_dtypes(fn):
    """The dtypes the fused attention kernel sees while `fn` runs (forward and backward)."""
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func.overloadpacket):
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


@pytest.mark.parametrize("slow,attention,want", [(True, "auto", torch.float32), (False, "auto", BF16),
                                                 (False, "fp32", torch.float32), (True, "autocast", BF16)])
def test_precision_autocast_attention_policy(monkeypatch, slow, attention, want):
    monkeypatch.setattr(precision, "cpu_native_dtype", lambda dtype: True)
    monkeypatch.setattr(precision, "cpu_bf16_attention_is_slow", lambda: slow)
    q = torch.randn(2, 3, 17, 8, requires_grad=True)

    def run():
        with precision.autocast("cpu", "bf16", attention=attention):
            a = nn.functional.linear(q, torch.randn(8, 8))  # a bf16 GEMM: autocast is on
            y = F.scaled_dot_product_attention(a, a, a)
        assert a.dtype == BF16 and y.dtype == BF16
        y.float().sum().backward()
        return y

    seen = sdpa_dtypes(run)
    assert seen and all(d == want for d in seen)
    with torch.no_grad():  # the same attention in fp32, on the bf16-rounded inputs
        a = nn.functional.linear(q, torch.randn(8, 8))
    ref = F.scaled_dot_product_attention(a, a, a)
    with precision.autocast("cpu", "bf16", attention=attention):
        got = F.scaled_dot_product_attention(a.to(BF16), a.to(BF16), a.to(BF16))
    assert rel_err(got, ref) < 2e-2


def test_precision_autocast_checks_and_fp32():
    with precision.autocast("cpu", None):  # no autocast at all
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="attention must be"), precision.autocast("cpu", "bf16", attention="half"):
        pass
    with pytest.raises(ValueError, match="autocast dtype must be one of"), precision.autocast("cpu", "int8"):
        pass


def test_precision_autocast_refuses_without_native_bf16(no_native_bf16):
    with pytest.raises(precision.SlowAutocastError, match="no native bf16"), precision.autocast("cpu", "bf16"):
        pass


def test_attention_policy_reads_amx(monkeypatch):
    monkeypatch.setattr(precision, "cpu_native_dtype", lambda dtype: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert not precision.cpu_bf16_attention_is_slow()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_attention_is_slow()
