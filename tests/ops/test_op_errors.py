"""Bad input raises a clear error naming the problem."""
import pytest
import torch
from helpers import factors

import imse_kernels
from imse_kernels import spectral_linear, use_backend


@pytest.fixture
def f():
    return factors(8, 6, 5)


def test_shape_mismatch(f):
    U, s, Vh, b = f
    with pytest.raises(ValueError, match="x has shape"):
        spectral_linear(torch.randn(3, 7), U, s, Vh, b)
    with pytest.raises(ValueError, match="rank mismatch"):
        spectral_linear(torch.randn(3, 8), U, s[:4], Vh, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        spectral_linear(torch.randn(3, 8), U, s, Vh, b[:3])
    with pytest.raises(ValueError, match="expected U"):
        spectral_linear(torch.randn(3, 8), U, s[None], Vh, b)


def test_integer_and_mixed_dtypes(f):
    U, s, Vh, b = f
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*int64"):
        spectral_linear(torch.ones(3, 8, dtype=torch.int64), U, s, Vh, b)
    with pytest.raises(TypeError, match="share a dtype"):
        spectral_linear(torch.randn(3, 8, dtype=torch.float64), U, s, Vh, b)


def test_mixed_devices(f):
    U, s, Vh, b = f
    with pytest.raises(ValueError, match="one device"):
        spectral_linear(torch.randn(3, 8, device="meta"), U, s, Vh, b)


def test_frozen_factors_required(f):
    U, s, Vh, b = f
    with pytest.raises(ValueError, match="U and Vh are frozen"):
        spectral_linear(torch.randn(3, 8), U.requires_grad_(True), s, Vh, b)


def test_unknown_backend(f, monkeypatch):
    U, s, Vh, b = f
    with pytest.raises(ValueError, match="unknown backend 'foo'"):
        with use_backend("foo"):
            pass
    monkeypatch.setenv("IMSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        spectral_linear(torch.randn(3, 8), U, s, Vh, b)


def test_unavailable_backend_raises_when_asked(f, monkeypatch):
    unavailable = [n for n, r in imse_kernels.backend_status().items() if r is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match="unavailable"):
        with use_backend(unavailable[0]):
            pass
    U, s, Vh, b = f
    monkeypatch.setenv("IMSE_BACKEND", unavailable[0])
    with pytest.raises(RuntimeError, match="unavailable"):
        spectral_linear(torch.randn(3, 8), U, s, Vh, b)


def test_backend_that_cannot_run_on_device():
    if torch.cuda.is_available():
        pytest.skip("needs a CPU-only machine")
    if "cpu" not in imse_kernels.available_backends():
        pytest.skip("cpu backend not built")
    from imse_kernels.backends import get_backend

    assert not get_backend("cpu").supports(torch.device("meta"))


@pytest.mark.parametrize("route", ["factorized", "recomposed"])
def test_second_derivatives_raise_instead_of_being_wrong(route):
    from imse_kernels.ops import force_route

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    U, Vh = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    s = torch.rand(3, dtype=torch.float64, requires_grad=True)
    with force_route(route):
        y = spectral_linear(x, U, s, Vh)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
    with pytest.raises(RuntimeError):  # the gradient's graph does not reach s: no silent partial answer
        torch.autograd.grad(gx.sum(), s)
