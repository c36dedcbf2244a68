"""Per-sample codes in the op (docs/design.md §8): s is a (K, r) table and row n uses s[index[n]].

Checked against a per-code loop in float64 (values, dx, ds), by gradcheck, on every CPU backend, for
K = 1, codes no sample uses, per-sample and per-row indices, 3-D x; plus opcheck, torch.compile,
determinism and bad inputs."""
import pytest
import torch
from helpers import code_table, cpu_backends, factors, tiny_vit

from imse_kernels import spectral_linear, use_backend
from imse_kernels.backends.base import segment_sum, sorted_segment_sum
from imse_kernels.ops.planner import FACTORIZED
from imse_kernels.ops.spectral_linear import _backward_op, _forward_op

CPU_BACKENDS = cpu_backends()


def per_code_loop(x, U, S, Vh, b, rows_index):
    """The oracle: each row through the one-code formula with its own code, in float64."""
    xs = x.double().reshape(-1, x.shape[-1])
    out = torch.stack([((xs[n] @ Vh.double().t()) * S.double()[int(rows_index[n])]) @ U.double().t()
                       for n in range(xs.shape[0])])
    out = out + b.double() if b is not None else out
    return out.reshape(*x.shape[:-1], U.shape[0])


# (x shape, d_in, d_out, r, K, index kind): N = 1, odd sizes, truncated rank, K = 1, unused codes, 3-D
CASES = [
    ((1, 13), 13, 29, 13, 1, "sample"),
    ((7, 24), 24, 9, 9, 5, "sample"),       # 7 samples over 5 codes: some codes may be unused
    ((3, 5, 17), 17, 31, 6, 4, "sample"),   # one code per sample, broadcast over 5 tokens
    ((3, 5, 17), 17, 31, 6, 4, "row"),      # one code per row
    ((2, 3, 33), 33, 20, 20, 8, "sample"),  # codes 2..7 unused
]


def _index(shape, k, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = shape[:1] if kind == "sample" else shape[:-1]
    return torch.randint(0, k, lead, generator=g)


def _rows(index, shape):
    return index.repeat_interleave(int(torch.tensor(shape[1:-1]).prod())) if index.dim() == 1 and len(shape) > 2 \
        else index.reshape(-1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,d_in,d_out,r,k,kind", CASES)
def test_matches_per_code_loop_float32(backend, shape, d_in, d_out, r, k, kind):
    U, _, Vh, b = factors(d_in, d_out, r)
    S = code_table(k, r).requires_grad_(True)
    x = torch.randn(*shape, requires_grad=True)
    index = _index(shape, k, kind)
    with use_backend(backend):
        y = spectral_linear(x, U, S, Vh, b, index=index)
    x64 = x.detach().double().requires_grad_(True)
    S64 = S.detach().double().requires_grad_(True)
    y64 = per_code_loop(x64, U, S64, Vh, b, _rows(index, shape))
    assert y.shape == (*shape[:-1], d_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert S.grad.shape == (k, r) and S.grad.dtype == torch.float32
    torch.testing.assert_close(S.grad.double(), S64.grad, rtol=1e-4, atol=1e-4)
    unused = sorted(set(range(k)) - set(index.reshape(-1).tolist()))
    if unused:
        assert torch.equal(S.grad[unused], torch.zeros(len(unused), r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["sample", "row"])
def test_gradcheck_float64(backend, kind):
    U, _, Vh, b = factors(11, 7, 5, torch.float64, torch.float64)
    S = code_table(3, 5, torch.float64).requires_grad_(True)
    x = torch.randn(4, 2, 11, dtype=torch.float64, requires_grad=True)
    index = _index(x.shape, 3, kind)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, S: spectral_linear(x, U, S, Vh, b, index=index), (x, S))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_code_equals_the_unindexed_op(backend):
    """K = 1 with every sample on code 0 is the one-code op (to round-off: the scale is applied to h,
    not folded into U)."""
    U, s, Vh, b = factors(24, 18, 12)
    x = torch.randn(6, 24)
    with use_backend(backend):
        y1 = spectral_linear(x, U, s, Vh, b)
        yk = spectral_linear(x, U, s[None], Vh, b, index=torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(yk, y1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ds_in_float32(dtype):
    U, _, Vh, b = factors(48, 40, 24)
    S = code_table(3, 24).requires_grad_(True)
    x = torch.randn(10, 48).to(dtype)
    index = _index(x.shape, 3, "sample")
    y = spectral_linear(x, U.to(dtype), S, Vh.to(dtype), b.to(dtype), index=index)
    ref = per_code_loop(x, U.to(dtype), S.detach(), Vh.to(dtype), b.to(dtype), index)
    assert y.dtype == dtype
    assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    y.float().sum().backward()
    assert S.grad.dtype == torch.float32 and torch.isfinite(S.grad).all()


def test_segment_sums_are_deterministic_and_agree():
    """The CPU's ordered index_add_ and the sort-based reduction (used off the CPU) give the same
    sums, and repeated calls are bitwise equal."""
    rows = torch.randn(500, 7, dtype=torch.float64)
    index = torch.randint(0, 6, (500,))
    a, b = segment_sum(rows, index, 8), sorted_segment_sum(rows, index, 8)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(a[6:], torch.zeros(2, 7)) and torch.equal(b[6:], torch.zeros(2, 7))
    assert torch.equal(segment_sum(rows, index, 8), a) and torch.equal(sorted_segment_sum(rows, index, 8), b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    U, _, Vh, b = factors(12, 10, 6)
    S = code_table(3, 6)
    idx = torch.tensor([0, 2, 2, 1, 0])
    with use_backend(backend):
        for need_ds, need_dx in ((True, True), (True, False), (False, True), (False, False)):
            x = torch.randn(5, 12, requires_grad=need_dx)
            torch.library.opcheck(_forward_op, (x, U, S.clone().requires_grad_(need_ds), Vh, b, idx,
                                                FACTORIZED, need_ds, need_dx))
        g, h = torch.randn(5, 10), torch.randn(5, 6)
        torch.library.opcheck(_backward_op, (g, h, U, S, Vh, None, idx, FACTORIZED, True, True))
        torch.library.opcheck(_backward_op, (g, None, U, S, Vh, None, idx, FACTORIZED, False, True))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    U, _, Vh, b = factors(12, 10, 6)
    S = code_table(3, 6).requires_grad_(True)
    idx = torch.tensor([0, 2, 2, 1])
    x = torch.randn(4, 7, 12)

    def f(x, S, idx):
        return spectral_linear(x, U, S, Vh, b, index=idx).square().sum()

    loss_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, S, idx)
    (g_c,) = torch.autograd.grad(loss_c, S)
    loss_e = f(x, S, idx)
    (g_e,) = torch.autograd.grad(loss_e, S)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)


def test_bad_index_inputs():
    U, s, Vh, b = factors(12, 10, 6)
    S = code_table(3, 6)
    x = torch.randn(4, 5, 12)
    ok = torch.tensor([0, 1, 2, 0])
    with pytest.raises(IndexError, match=r"\[0, K=3\).*max 3"):
        spectral_linear(x, U, S, Vh, b, index=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(IndexError, match="min -1"):
        spectral_linear(x, U, S, Vh, b, index=torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="int64"):
        spectral_linear(x, U, S, Vh, b, index=ok.int())
    with pytest.raises(TypeError, match="int64"):
        spectral_linear(x, U, S, Vh, b, index=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="index must have shape"):
        spectral_linear(x, U, S, Vh, b, index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="index must have shape"):
        spectral_linear(x[0, 0], U, S, Vh, b, index=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"code table \(K, r\)"):
        spectral_linear(x, U, s, Vh, b, index=ok)
    with pytest.raises(ValueError, match="needs index="):
        spectral_linear(x, U, S, Vh, b)
    with pytest.raises(ValueError, match="rank mismatch"):
        spectral_linear(x, U, code_table(3, 5), Vh, b, index=ok)
    with pytest.raises(ValueError, match="index is on meta"):
        spectral_linear(x, U, S, Vh, b, index=ok.to("meta"))


# --------------------------------------------------------------------------------------------
# The module: a code table per layer, selected per forward by `stream_codes`

def _small_vit():
    """The tiny ViT at 16 px (width 24, 2 heads, 2 blocks, 5 classes), spectralized, in eval mode."""
    return tiny_vit(depth=2, head_scale=None, spectral=True, img_size=16, embed_dim=24, num_heads=2,
                    num_classes=5).eval()


def test_stream_codes_equal_separate_models():
    """Sample b through the coded model equals sample b through a copy whose s is code index[b]."""
    import copy

    from imse_kernels import stream_codes
    from imse_kernels.layers import coded_layers, spectral_layers

    model = _small_vit()
    x = torch.randn(5, 3, 16, 16)
    before = model(x)
    for m in spectral_layers(model).values():
        m.enable_codes(3)
        with torch.no_grad():
            m.codes.mul_(torch.rand(3, 1) + 0.5)
    assert len(coded_layers(model)) == 8
    torch.testing.assert_close(model(x), before)  # outside the block: s, exactly as before
    index = torch.tensor([2, 0, 1, 2, 0])
    with stream_codes(model, index):
        y = model(x)
    for b in range(5):
        single = copy.deepcopy(model)
        for m in spectral_layers(single).values():
            with torch.no_grad():
                m.s.copy_(m.codes[index[b]])
            m.disable_codes()
        torch.testing.assert_close(y[b:b + 1], single(x[b:b + 1]), rtol=1e-5, atol=1e-5)


def test_stream_codes_gradients_reach_only_the_used_rows():
    from imse_kernels import stream_codes
    from imse_kernels.layers import spectral_layers

    model = _small_vit()
    layer = spectral_layers(model)["blocks.1.mlp.fc1"]
    layer.s.requires_grad_(True)
    codes = layer.enable_codes(4)
    assert codes.requires_grad and codes.shape == (4, layer.rank)
    with stream_codes(model, torch.tensor([1, 1, 3])):
        model(torch.randn(3, 3, 16, 16)).square().sum().backward()
    assert layer.s.grad is None
    assert torch.equal(codes.grad[[0, 2]], torch.zeros(2, layer.rank)) and codes.grad[[1, 3]].abs().sum() > 0


def test_stream_codes_bad_inputs():
    from imse_kernels import stream_codes
    from imse_kernels.layers import spectral_layers

    model = _small_vit()
    with pytest.raises(ValueError, match="enable_codes"):
        with stream_codes(model, torch.tensor([0])):
            pass
    spectral_layers(model)["blocks.0.attn.qkv"].enable_codes(2)
    with pytest.raises(IndexError, match=r"\[0, K=2\)"):
        with stream_codes(model, torch.tensor([0, 2])):
            pass
    with pytest.raises(TypeError, match="int64"):
        with stream_codes(model, torch.tensor([0.0])):
            pass
    with pytest.raises(ValueError, match="num_codes"):
        spectral_layers(model)["blocks.0.attn.qkv"].enable_codes(0)
    with pytest.raises(ValueError, match="index must have shape"):
        with stream_codes(model, torch.tensor([0, 1, 1])):
            model(torch.randn(2, 3, 16, 16))
