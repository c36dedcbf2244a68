"""The op `spectral_linear`: float64 gradcheck, the CPU backends against the oracle on odd shapes,
both routes, opcheck, determinism, NaN and empty batches."""
import pytest
import torch
from helpers import cpu_backends, factors, oracle

import imse_kernels
from imse_kernels import spectral_linear, use_backend
from imse_kernels.ops import force_route
from imse_kernels.ops.planner import FACTORIZED, RECOMPOSED
from imse_kernels.ops.spectral_linear import _backward_op, _forward_op

CPU_BACKENDS = cpu_backends()
ROUTES = ["factorized", "recomposed"]

# (lead shape, d_in, d_out, r): N = 1, sizes not multiples of 8, truncated rank, 3-D and 4-D x
SHAPES = [
    ((1,), 13, 29, 13),
    ((7,), 24, 9, 9),
    ((3, 5), 17, 31, 6),
    ((2, 3, 4), 33, 20, 20),
    ((65,), 40, 40, 40),
]


def test_cpu_extension_is_built():
    """The C++ CPU backend must be present in every supported install (CI builds it)."""
    assert "cpu" in imse_kernels.available_backends(), imse_kernels.backend_status()["cpu"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(backend, route, with_bias):
    U, s, Vh, b = factors(11, 7, 5, torch.float64, torch.float64, bias=with_bias)
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    s.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    with use_backend(backend), force_route(route):
        assert torch.autograd.gradcheck(lambda x, s, b: spectral_linear(x, U, s, Vh, b), (x, s, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("lead,d_in,d_out,r", SHAPES)
def test_matches_oracle_float32(backend, route, lead, d_in, d_out, r):
    U, s, Vh, b = factors(d_in, d_out, r)
    x = torch.randn(*lead, d_in, requires_grad=True)
    s.requires_grad_(True)
    with use_backend(backend), force_route(route):
        y = spectral_linear(x, U, s, Vh, b)
    x64 = x.detach().double().requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True)
    y64 = oracle(x64, U, s64, Vh, b)
    assert y.shape == (*lead, d_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-4)
    assert s.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_float32(backend, route, dtype):
    """bf16/fp16 inputs with an fp32 s: error within what the dtype allows, ds in fp32."""
    U, s, Vh, b = factors(48, 40, 24)
    x = torch.randn(37, 48)
    xl = x.to(dtype).requires_grad_(True)
    sl = s.clone().requires_grad_(True)
    with use_backend(backend), force_route(route):
        y = spectral_linear(xl, U.to(dtype), sl, Vh.to(dtype), b.to(dtype))
    ref = oracle(xl.detach(), U.to(dtype), s, Vh.to(dtype), b.to(dtype))
    assert y.dtype == dtype
    scale = ref.abs().max()
    assert (y.double() - ref).abs().max() / scale < 3e-2
    y.float().sum().backward()
    s64 = s.double().requires_grad_(True)
    oracle(xl.detach(), U.to(dtype), s64, Vh.to(dtype), b.to(dtype)).sum().backward()
    assert sl.grad.dtype == torch.float32
    assert (sl.grad.double() - s64.grad).abs().max() / s64.grad.abs().max() < 3e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    U, s, Vh, b = factors(19, 23, 19)
    x = torch.randn(19, 10).t()  # (10, 19), non-contiguous
    assert not x.is_contiguous()
    Ut = torch.randn(19, 23).t()  # non-contiguous U
    for route in ROUTES:
        with use_backend(backend), force_route(route):
            torch.testing.assert_close(spectral_linear(x, Ut, s, Vh, b).double(), oracle(x, Ut, s, Vh, b),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_s_gives_input_grad_only(backend):
    U, s, Vh, b = factors(16, 12, 8)
    x = torch.randn(4, 16, requires_grad=True)
    for route in ROUTES:
        x.grad = None
        with use_backend(backend), force_route(route):
            spectral_linear(x, U, s, Vh, b).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        oracle(x64, U, s, Vh, b).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert s.grad is None


def test_routes_and_backends_agree_bitwise_on_repeat():
    """ds is deterministic: the same call twice, and with 1 or 2 threads, gives identical bits."""
    U, s, Vh, b = factors(64, 96, 64)
    x = torch.randn(300, 64)
    g = torch.randn(300, 96)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, max(2, threads), 1):
            torch.set_num_threads(n_threads)
            for route in ROUTES:
                s_ = s.clone().requires_grad_(True)
                with use_backend(CPU_BACKENDS[-1]), force_route(route):
                    spectral_linear(x, U, s_, Vh, b).backward(g)
                results.append((route, n_threads, s_.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    by_route = {}
    for route, _, ds in results:
        by_route.setdefault(route, []).append(ds)
    for route, grads in by_route.items():
        assert all(torch.equal(grads[0], d) for d in grads[1:]), route


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_like_linear(backend):
    U, s, Vh, b = factors(8, 6, 6)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    W = (U * s) @ Vh
    ref = torch.nn.functional.linear(x, W, b)
    with use_backend(backend):
        y = spectral_linear(x, U, s, Vh, b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
def test_empty_batch(backend, route):
    U, s, Vh, b = factors(8, 6, 5)
    s.requires_grad_(True)
    x = torch.randn(0, 4, 8, requires_grad=True)
    with use_backend(backend), force_route(route):
        y = spectral_linear(x, U, s, Vh, b)
    assert y.shape == (0, 4, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_trainable_bias_gets_gradient():
    U, s, Vh, b = factors(8, 6, 5)
    b.requires_grad_(True)
    x = torch.randn(4, 8)
    spectral_linear(x, U, s, Vh, b).sum().backward()
    torch.testing.assert_close(b.grad, torch.full_like(b, 4.0))


def _sample_inputs():
    for route in (FACTORIZED, RECOMPOSED):
        for need_ds, need_dx in ((True, True), (True, False), (False, True), (False, False)):
            U, s, Vh, b = factors(12, 10, 6)
            x = torch.randn(5, 12, requires_grad=need_dx)
            s.requires_grad_(need_ds)
            yield (x, U, s, Vh, b, None, route, need_ds, need_dx)
    U, s, Vh, _ = factors(12, 10, 6)
    yield (torch.randn(5, 12, requires_grad=True), U, s, Vh, None, None, RECOMPOSED, False, True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    with use_backend(backend):
        for args in _sample_inputs():
            torch.library.opcheck(_forward_op, args)
        U, s, Vh, _ = factors(12, 10, 6)
        g = torch.randn(5, 10)
        h = torch.randn(5, 6)
        x = torch.randn(5, 12)
        W = (U * s) @ Vh
        torch.library.opcheck(_backward_op, (g, h, U, s, Vh, None, None, FACTORIZED, True, True))
        torch.library.opcheck(_backward_op, (g, x, U, s, Vh, W, None, RECOMPOSED, True, False))
        torch.library.opcheck(_backward_op, (g, None, U, s, Vh, W, None, RECOMPOSED, False, True))


def test_planner_picks_cost_model_routes():
    """docs/design.md §2: at ViT-B batch 64 the square proj recomposes and the rectangular layers factorize;
    at batch 1 everything factorizes; frozen s with a cached weight is one GEMM."""
    from imse_kernels.ops import plan

    n = 64 * 197
    assert plan(n, 768, 768, 768, True, True, False).route == RECOMPOSED
    for d_in, d_out in ((768, 2304), (768, 3072), (3072, 768)):
        assert plan(n, d_in, d_out, min(d_in, d_out), True, True, False).route == FACTORIZED
    assert plan(197, 768, 768, 768, True, True, False).route == FACTORIZED
    assert plan(197, 768, 768, 768, False, False, True).route == RECOMPOSED
    assert plan(197, 768, 768, 16, False, False, True).route == FACTORIZED  # low rank: cheaper factorized
