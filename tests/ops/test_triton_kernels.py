"""The Triton kernels themselves, run on the CPU through the interpreter (TRITON_INTERPRET=1, set
by conftest before triton is imported), against float64 oracles and PyTorch's own error.

Shapes are odd on purpose: the interpreter tile is 16, so every dimension below leaves a partial
tile, and the rank spans two chunks. bf16 runs too (the launchers cast bf16 to fp32 before `tl.dot`
in the interpreter, which mishandles bf16 dots).
"""
import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, oracle_backward, oracle_forward, spectral_inputs  # noqa: E402

from imse_kernels.triton_kernels import runtime, tuning  # noqa: E402
from imse_kernels.triton_kernels.chain import chain  # noqa: E402
from imse_kernels.triton_kernels.recomposed_ds import recomposed_ds  # noqa: E402
from imse_kernels.triton_kernels.scaled_matmul import scaled_matmul  # noqa: E402

pytestmark = pytest.mark.skipif(not runtime.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (N, d_in, d_out, r)
    (1, 45, 29, 23),    # a single row
    (37, 45, 29, 23),   # nothing a multiple of the tile
    (33, 20, 50, 17),   # d_out > d_in, truncated rank
]


def _dev(*ts):
    dev = "cuda" if (not runtime.INTERPRETED and torch.cuda.is_available()) else "cpu"
    return [None if t is None else t.to(dev) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_forward_with_h(shape, dtype):
    n, d_in, d_out, r = shape
    x, U, s, Vh, b = _dev(*spectral_inputs(n, d_in, d_out, r, dtype))
    y, h, ds = chain(x, Vh.t(), s, U.t(), b, save_h=True)
    y64, h64 = oracle_forward(x, U, s, Vh, b)
    y_torch = torch.addmm(b, x @ Vh.t(), (U.float() * s).to(dtype).t())
    assert ds is None
    assert_close(y, y64, y_torch, "y")
    assert_close(h, h64, x @ Vh.t(), "h")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_backward_ds_and_dx(shape, dtype):
    n, d_in, d_out, r = shape
    x, U, s, Vh, _ = _dev(*spectral_inputs(n, d_in, d_out, r, dtype, bias=False))
    g = torch.randn(n, d_out, device=x.device).to(dtype)
    h = x @ Vh.t()
    dx, hout, ds = chain(g, U, s, Vh, h=h)
    assert hout is None
    dx64, ds64 = oracle_backward(g, h, U, s, Vh)
    t = g @ U
    assert_close(dx, dx64, t @ (Vh.float() * s[:, None]).to(dtype), "dx")
    assert ds.dtype == torch.float32
    assert_close(ds, ds64, (h.float() * t.float()).sum(0), "ds", dtype)


def test_chain_bias_none_and_noncontiguous_operands():
    n, d_in, d_out, r = 21, 40, 19, 18
    x, U, s, Vh, _ = _dev(*spectral_inputs(n, 2 * d_in, d_out, r, torch.float32, bias=False))
    x = x[:, ::2]                      # strided rows
    Vh = Vh[:, ::2]
    Ut = U.t().contiguous().t()         # column-major U
    assert not x.is_contiguous() and not Ut.is_contiguous()
    y, _, _ = chain(x, Vh.t(), s, Ut.t())
    assert_close(y, oracle_forward(x, Ut, s, Vh, None)[0], None, "y")


def test_chain_tile_configs_agree():
    """Every rank chunking / tile shape gives the same answer (masks and loops, not one tile)."""
    x, U, s, Vh, b = _dev(*spectral_inputs(40, 50, 35, 33, torch.float32))
    ref = oracle_forward(x, U, s, Vh, b)[0]
    for bm, bn, br, bk in [(16, 16, 16, 16), (32, 64, 16, 32), (16, 32, 64, 16)]:
        cfg = tuning.make(2, 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk, GROUP_M=2)
        y = chain(x, Vh.t(), s, U.t(), b, cfg=cfg)[0]
        assert_close(y, ref, None, f"y with {cfg.name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_matmul_scale_k_with_bias(dtype):
    """y = (h ⊙ s)·Uᵀ + b, the recomposition pattern: s on the reduction dimension."""
    x, U, s, Vh, b = _dev(*spectral_inputs(37, 45, 29, 23, dtype))
    h = x @ Vh.t()
    c, ds = scaled_matmul(h, U.t(), s, b, scale="k")
    assert ds is None
    ref = (h.double() * s.double()) @ U.double().t() + b.double()
    assert_close(c, ref, torch.addmm(b, h, (U.float() * s).to(dtype).t()), "c")


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_matmul_scale_n_with_ds_epilogue(dtype):
    """ts = (g·U) ⊙ s and ds = Σ h ⊙ (g·U): the split backward's first stage."""
    x, U, s, Vh, _ = _dev(*spectral_inputs(37, 45, 29, 23, dtype, bias=False))
    g = torch.randn(37, 29, device=x.device).to(dtype)
    h = x @ Vh.t()
    ts, ds = scaled_matmul(g, U, s, scale="n", h=h)
    t64 = g.double() @ U.double()
    assert_close(ts, t64 * s.double(), ((g @ U).float() * s).to(dtype), "ts")
    assert_close(ds, (t64 * h.double()).sum(0), ((g @ U).float() * h.float()).sum(0), "ds", dtype)
    none, ds_only = scaled_matmul(g, U, h=h, write_c=False)
    assert none is None
    assert torch.equal(ds_only, ds)  # same tiles, same order: bitwise equal


def test_scaled_matmul_unscaled_noncontiguous():
    a = _dev(torch.randn(30, 70))[0][:, ::2]
    b = _dev(torch.randn(17, 35))[0].t()
    c, _ = scaled_matmul(a, b)
    assert_close(c, a.double() @ b.double(), None, "c")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(29, 45, 23), (50, 20, 17)])
def test_recomposed_ds(dims, dtype):
    d_out, d_in, r = dims
    _, U, s, Vh, _ = _dev(*spectral_inputs(1, d_in, d_out, r, dtype, bias=False))
    x = torch.randn(13, d_in, device=U.device).to(dtype)
    g = torch.randn(13, d_out, device=U.device).to(dtype)
    G = g.t() @ x
    ds = recomposed_ds(U, G, Vh)
    ref = ((U.double().t() @ G.double()) * Vh.double()).sum(1)
    torch_ds = ((U.float().t() @ G.float()) * Vh.float()).sum(1)
    assert ds.dtype == torch.float32
    assert_close(ds, ref, torch_ds, "ds", dtype)


def test_launchers_reject_bad_operands():
    x, U, s, Vh, b = _dev(*spectral_inputs(5, 20, 18, 16, torch.float32))
    with pytest.raises(TypeError, match="share one dtype"):
        chain(x, Vh.t().half(), s, U.t(), b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        scaled_matmul(x.double(), Vh.t().double())
    with pytest.raises(ValueError, match="do not chain"):
        chain(x, Vh.t(), s[:-1], U.t(), b)
    with pytest.raises(ValueError, match="inner dimensions"):
        scaled_matmul(x, U)
    with pytest.raises(ValueError, match="scale must be"):
        scaled_matmul(x, Vh.t(), s, scale="m")
    with pytest.raises(ValueError, match="must be 2-D"):
        recomposed_ds(U, torch.zeros(18, device=U.device), Vh)
    with pytest.raises(ValueError, match="nothing to compute"):
        scaled_matmul(x, Vh.t(), write_c=False)


def test_empty_batch():
    x, U, s, Vh, b = _dev(*spectral_inputs(3, 20, 18, 16, torch.float32))
    y, _, ds = chain(x[:0], Vh.t(), s, U.t(), b, h=(x @ Vh.t())[:0])
    assert y.shape == (0, 18) and torch.equal(ds, torch.zeros_like(ds))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_with_per_row_codes(shape, dtype):
    """index: s is a (C, R) table gathered per row; ds is summed per code (unused codes get zeros)."""
    n, d_in, d_out, r = shape
    x, U, s, Vh, b = _dev(*spectral_inputs(n, d_in, d_out, r, dtype))
    codes = 5
    S = _dev(torch.rand(codes, r) + 0.5)[0]
    index = _dev(torch.randint(0, codes - 1, (n,)))[0]  # the last code is never used
    y, h, _ = chain(x, Vh.t(), S, U.t(), b, save_h=True, index=index)
    h64 = x.double() @ Vh.double().t()
    y64 = (h64 * S.double()[index]) @ U.double().t() + b.double()
    y_torch = torch.addmm(b, ((x @ Vh.t()).float() * S[index]).to(dtype), U.t())
    assert_close(y, y64, y_torch, "y")
    g = torch.randn(n, d_out, device=x.device).to(dtype)
    dx, _, dS = chain(g, U, S, Vh, h=h, index=index)
    t64 = g.double() @ U.double()
    dx64 = (t64 * S.double()[index]) @ Vh.double()
    dS64 = torch.zeros(codes, r, dtype=torch.float64, device=x.device).index_add_(0, index, t64 * h.double())
    t = (g @ U).float()
    assert_close(dx, dx64, ((t * S[index]).to(dtype) @ Vh), "dx")
    assert dS.shape == (codes, r) and dS.dtype == torch.float32
    dS_ref = torch.zeros(codes, r, device=x.device).index_add_(0, index, t * h.float())
    assert_close(dS, dS64, dS_ref, "ds", dtype)
    assert torch.equal(dS[-1], torch.zeros_like(dS[-1]))
