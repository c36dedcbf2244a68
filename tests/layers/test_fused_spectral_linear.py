"""`FusedSpectralLinear`: conversion from/to nn.Linear, state_dict, autocast, the weight cache."""
import pytest
import torch
from torch import nn

from imse_kernels import FusedSpectralLinear
from imse_kernels.ops import force_route


@pytest.mark.parametrize("d_in,d_out", [(37, 53), (64, 16), (24, 24)])
def test_from_linear_reproduces_linear(d_in, d_out):
    lin = nn.Linear(d_in, d_out)
    layer = FusedSpectralLinear.from_linear(lin)
    x = torch.randn(3, 7, d_in)
    for route in ("factorized", "recomposed"):
        with force_route(route):
            torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    assert layer.U.shape == (d_out, min(d_in, d_out)) and layer.Vh.shape == (min(d_in, d_out), d_in)
    assert layer.s.dtype == torch.float32 and layer.s.requires_grad
    assert not layer.U.requires_grad and not layer.Vh.requires_grad
    assert isinstance(layer.s, nn.Parameter) and [n for n, _ in layer.named_parameters()] == ["s"]


def test_truncated_rank_and_tolerance():
    lin = nn.Linear(20, 30)
    layer = FusedSpectralLinear.from_linear(lin, rank=5)
    assert layer.rank == 5 and layer.s.shape == (5,)
    U, S, Vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
    torch.testing.assert_close(layer.weight.double(), (U[:, :5] * S[:5]) @ Vh[:5], rtol=1e-5, atol=1e-6)
    low = nn.Linear(20, 30, bias=False)
    with torch.no_grad():
        low.weight.copy_(torch.randn(30, 3) @ torch.randn(3, 20))
    assert FusedSpectralLinear.from_linear(low, tol=1e-4).rank == 3
    with pytest.raises(ValueError, match="rank"):
        FusedSpectralLinear.from_linear(lin, rank=21)


def test_to_linear_round_trip():
    lin = nn.Linear(12, 9)
    back = FusedSpectralLinear.from_linear(lin).to_linear()
    torch.testing.assert_close(back.weight, lin.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.bias, lin.bias)


def test_state_dict_round_trip():
    a = FusedSpectralLinear.from_linear(nn.Linear(10, 6))
    with torch.no_grad():
        a.s.mul_(1.5)
    b = FusedSpectralLinear(10, 6)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"U", "s", "Vh", "bias"}
    x = torch.randn(4, 10)
    torch.testing.assert_close(a(x), b(x))


def test_trainable_bias_option():
    layer = FusedSpectralLinear.from_linear(nn.Linear(8, 4), trainable_bias=True)
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "s"]
    assert FusedSpectralLinear.from_linear(nn.Linear(8, 4, bias=False)).bias is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    lin = nn.Linear(32, 48)
    layer = FusedSpectralLinear.from_linear(lin)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        ref = lin(x)
    assert y.dtype == ref.dtype == dtype
    assert (y.float() - ref.float()).abs().max() < 5e-2
    y.float().sum().backward()
    assert layer.s.grad.dtype == torch.float32 and torch.isfinite(layer.s.grad).all()


def test_frozen_inference_uses_cached_weight_once():
    layer = FusedSpectralLinear.from_linear(nn.Linear(64, 64))
    x = torch.randn(50, 64)
    with torch.no_grad():
        y1 = layer(x)
        layer(x)
    assert layer._weight_cache.misses == 1
    with torch.no_grad():
        layer.s.mul_(2.0)  # in-place update bumps the version: the cache must refresh
        y2 = layer(x)
    assert layer._weight_cache.misses == 2
    torch.testing.assert_close(y2 - layer.bias, 2 * (y1 - layer.bias), rtol=1e-5, atol=1e-5)
    layer.load_state_dict(FusedSpectralLinear.from_linear(nn.Linear(64, 64)).state_dict())
    with torch.no_grad():
        layer(x)
    assert layer._weight_cache.misses == 3


def test_training_step_changes_only_s():
    layer = FusedSpectralLinear.from_linear(nn.Linear(16, 16))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    after = layer.state_dict()
    assert not torch.equal(before["s"], after["s"])
    for k in ("U", "Vh", "bias"):
        assert torch.equal(before[k], after[k])


def test_extra_repr():
    text = repr(FusedSpectralLinear.from_linear(nn.Linear(20, 30), rank=7))
    assert "in_features=20" in text and "out_features=30" in text and "rank=7" in text


@pytest.mark.parametrize("d_in,d_out,rank,train_s", [(48, 16, None, False), (48, 16, None, True),
                                                     (16, 40, None, False), (24, 24, 9, False)])
def test_factor_tap_sees_h_and_leaves_the_layer_unchanged(d_in, d_out, rank, train_s):
    torch.manual_seed(0)
    layer = FusedSpectralLinear.from_linear(nn.Linear(d_in, d_out).double(), rank=rank)
    layer.s.requires_grad_(train_s)
    x = torch.randn(2, 5, d_in, dtype=torch.float64, requires_grad=True)
    y0 = layer(x)
    g0 = torch.autograd.grad(y0.square().sum(), [x] + ([layer.s] if train_s else []))
    seen = []
    layer.factor_tap = lambda rows, h: seen.append((rows, h))
    y1 = layer(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x] + ([layer.s] if train_s else []))
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    rows, h = seen[0]
    assert rows.shape == (10, d_in)
    r = layer.rank
    if not train_s and r < d_in:  # the factorized form is cheaper than W' plus the tap's own GEMM
        torch.testing.assert_close(h, rows @ layer.Vh.t(), rtol=1e-12, atol=1e-12)
        assert h.requires_grad
    else:
        assert h is None
    with torch.no_grad():
        layer(x)  # without gradients the tap is not called
    assert len(seen) == 1
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, d_in + 1, dtype=torch.float64))


def test_linear_attributes_and_read_only_weight():
    """Code written for nn.Linear reads in_features, out_features, bias and weight.shape."""
    lin = nn.Linear(12, 9)
    layer = FusedSpectralLinear.from_linear(lin)
    assert (layer.in_features, layer.out_features) == (12, 9)
    assert layer.weight.shape == lin.weight.shape and layer.weight.dtype == lin.weight.dtype
    assert not layer.weight.requires_grad
    torch.testing.assert_close(layer.weight, lin.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias, lin.bias)
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(9, 12)
    with torch.no_grad():
        layer.s.mul_(2)
    torch.testing.assert_close(layer.weight, 2 * lin.weight, rtol=1e-5, atol=1e-5)  # follows s


def test_to_linear_keeps_the_original_requires_grad():
    lin = nn.Linear(6, 5)
    lin.bias.requires_grad_(False)
    back = FusedSpectralLinear.from_linear(lin).to_linear()
    assert back.weight.requires_grad and not back.bias.requires_grad
