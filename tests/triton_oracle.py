"""Helpers shared by the Triton tests: float64 oracles and the tolerance rule.

A kernel result in dtype D passes when its max error against the float64 oracle (computed from the
same D-rounded inputs) is at most twice PyTorch's own error in D plus a small floor, relative to
the oracle's largest magnitude. In float32 the floor alone (1e-5, docs/design.md §4) also bounds it.
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close(got: torch.Tensor, ref64: torch.Tensor, torch_result: torch.Tensor = None, what: str = "",
                 dtype: torch.dtype = None) -> None:
    """got vs the float64 oracle; torch_result is PyTorch's own computation from the same inputs, if
    any; dtype is the inputs' dtype D (default got's: ds is float32 whatever D is)."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    dtype = dtype or got.dtype
    floor = FLOOR.get(dtype, 1e-5)
    tol = floor if torch_result is None else 2 * rel_err(torch_result, ref64) + floor
    if dtype == torch.float32:
        tol = min(tol, 1e-5)
    err = rel_err(got, ref64)
    assert err <= tol, f"{what}: relative error {err:.3g} > tolerance {tol:.3g} ({got.dtype})"


def factors(n: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, bias: bool = True, seed: int = 0):
    """x (n, d_in), U (d_out, r), s (r,) float32, Vh (r, d_in), bias (d_out,) or None; orthonormal-ish
    factors like a real SVD so the output has unit-scale entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    U = torch.linalg.qr(torch.randn(d_out, r, generator=g))[0] if d_out >= r else torch.randn(d_out, r, generator=g) / r ** 0.5
    Vh = torch.linalg.qr(torch.randn(d_in, r, generator=g))[0].t() if d_in >= r else torch.randn(r, d_in, generator=g) / d_in ** 0.5
    s = torch.rand(r, generator=g) * 2 + 0.25
    b = torch.randn(d_out, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return cast(x), cast(U), s, cast(Vh), cast(b)


def oracle_forward(x, U, s, Vh, bias):
    """float64 y, h."""
    h = x.double() @ Vh.double().t()
    y = (h * s.double()) @ U.double().t()
    if bias is not None:
        y = y + bias.double()
    return y, h


def oracle_backward(grad, h, U, s, Vh):
    """float64 dx, ds for the F route."""
    t = grad.double() @ U.double()
    return (t * s.double()) @ Vh.double(), (h.double() * t).sum(0)
