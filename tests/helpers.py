"""Shared test helpers: the float64 oracle and small random factors."""
import torch


def oracle(x, U, s, Vh, bias=None):
    """((x·Vhᵀ) ⊙ s)·Uᵀ + bias in float64."""
    y = ((x.double() @ Vh.double().t()) * s.double()) @ U.double().t()
    return y + bias.double() if bias is not None else y


def factors(d_in, d_out, r, dtype=torch.float32, s_dtype=torch.float32, bias=True):
    """Orthonormal U, Vh and positive s like an SVD produces, plus an optional bias."""
    U = torch.linalg.qr(torch.randn(d_out, r, dtype=torch.float64))[0].to(dtype)
    Vh = torch.linalg.qr(torch.randn(d_in, r, dtype=torch.float64))[0].t().contiguous().to(dtype)
    s = (torch.rand(r, dtype=torch.float64) + 0.5).to(s_dtype)
    b = torch.randn(d_out, dtype=dtype) if bias else None
    return U, s, Vh, b
