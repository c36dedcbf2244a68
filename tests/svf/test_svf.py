"""SVF (docs/design.md, section 15): the parametrisation, `SVFLinear` and per-sample expert mixing against
the dense formulation (Transformer²'s: recompose U·diag(S ⊙ m)·Vh·ΣS/Σ(S ⊙ m), dense autograd) in float64."""
import pytest
import torch
from torch import nn

from imse_kernels import svf
from imse_kernels.svf import SVFConfig, SVFLinear, mix_experts, svf_scale

CONFIGS = [SVFConfig(), SVFConfig("sigmoid", True, 2.0), SVFConfig("sigmoid", False), SVFConfig("identity", False),
           SVFConfig("identity", True)]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def dense_scale(S, z, cfg):
    """Transformer²'s Policy.get_mask and the rescale of compose_new_params, written out."""
    m = torch.sigmoid(z) * cfg.max_mult if cfg.mask == "sigmoid" else z
    rho = S.sum() / (S * m).sum() if cfg.rescale else 1.0
    return S * m * rho


def dense_weight(U, S, Vh, z, cfg):
    m = torch.sigmoid(z) * cfg.max_mult if cfg.mask == "sigmoid" else z
    W = U @ torch.diag_embed(S * m) @ Vh
    return W * (S.sum() / (S * m).sum()) if cfg.rescale else W


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def make(d_in=7, d_out=5, dtype=torch.float64, cfg=SVFConfig(), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=dtype))
    layer = SVFLinear.from_module(lin, svd_dtype=torch.float64, config=cfg)
    return lin, layer


@pytest.mark.parametrize("cfg", CONFIGS)
def test_scale_is_transformer2s_formula_rows_too(cfg):
    g = torch.Generator().manual_seed(1)
    S = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    Z = torch.randn(3, 6, generator=g, dtype=torch.float64) + 1.0
    for z in Z:
        assert torch.allclose(svf_scale(S, z, cfg), dense_scale(S, z, cfg), rtol=1e-14, atol=0)
    rows = svf_scale(S, Z, cfg)
    assert rows.shape == (3, 6)
    assert torch.allclose(rows, torch.stack([dense_scale(S, z, cfg) for z in Z]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 7), (4, 7)])
@pytest.mark.parametrize("d_in,d_out", [(7, 5), (5, 7)])
def test_starts_at_the_original_layer(shape, d_in, d_out):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 3e-6)):
        lin, layer = make(d_in, d_out, dtype)
        x = torch.randn(*shape[:-1], d_in, dtype=dtype)
        assert rel(layer(x), lin(x)) < tol
        xt = torch.randn(d_in, shape[0], dtype=dtype).t()  # non-contiguous
        assert rel(layer(xt), lin(xt)) < tol
        assert layer.S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("d_in,d_out", [(7, 5), (5, 9)])
def test_z_and_x_gradients_equal_the_dense_formulation_float64(cfg, d_in, d_out):
    lin, layer = make(d_in, d_out, cfg=cfg)
    with torch.no_grad():
        layer.z.copy_(torch.randn(layer.rank, dtype=torch.float64) * 0.7 + 1.0)
    x = torch.randn(3, 4, d_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, d_out, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    z = layer.z.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y = x2 @ dense_weight(layer.U, layer.S, layer.Vh, z, cfg).T + lin.bias
    (y * g).sum().backward()
    assert rel(layer.z.grad, z.grad) <= 1e-10
    assert rel(x.grad, x2.grad) <= 1e-10


def test_training_keeps_no_weight_sized_tensor_and_the_check_can_fail():
    """No recomposition, no dense dW: nothing of d_out × d_in is saved for backward; the same probe on
    the dense formulation does see one."""
    d_in, d_out = 24, 40
    lin, layer = make(d_in, d_out, torch.float32)
    x = torch.randn(6, d_in, requires_grad=True)

    held = {t.untyped_storage().data_ptr() for t in layer.buffers()}

    def saved_sizes(fn):  # sizes of the tensors saved for backward, the layer's own buffers left out
        sizes = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in held:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sizes

    ours = saved_sizes(lambda: layer(x))
    assert ours and max(ours) < d_out * d_in
    assert not layer._weight_cache._weights  # no W' held in any dtype
    dense = saved_sizes(lambda: x @ dense_weight(layer.U, layer.S, layer.Vh, layer.z, layer.config).T)
    assert max(dense) >= d_out * d_in


def test_frozen_z_computes_s_once_and_serves_one_gemm():
    lin, layer = make(16, 12, torch.float32)
    layer.z.requires_grad_(False)
    x = torch.randn(5, 16)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert layer._weight_cache.misses == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        layer.z.add_(0.5)  # in place: s and W' are rebuilt
        y3 = layer(x)
    assert layer._weight_cache.misses == 2
    W = dense_weight(layer.U.double(), layer.S.double(), layer.Vh.double(), layer.z.double(), layer.config)
    ref = x @ W.T.float()
    assert rel(y3 - lin.bias, ref) < 1e-5 and not torch.allclose(y3, y1)


@pytest.mark.parametrize("own_mask", [True, False])
@pytest.mark.parametrize("x_shape", [(3, 4), (3, 2, 4)])
def test_mixed_gradients_of_alpha_experts_and_x_equal_the_dense_formulation_float64(own_mask, x_shape):
    d_in, d_out, K = 6, 8, 3
    lin, layer = make(d_in, d_out, cfg=SVFConfig())
    Z = torch.randn(K, layer.rank, dtype=torch.float64) * 0.5 + 0.3
    layer.set_experts(Z, trainable=True)
    model = One(layer)
    B = x_shape[0]
    alpha = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1).requires_grad_(True)
    x = torch.randn(*x_shape[:-1], d_in, dtype=torch.float64, requires_grad=True) if len(x_shape) == 3 else \
        torch.randn(B, d_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*x.shape[:-1], d_out, dtype=torch.float64)
    with mix_experts(model, alpha, mask="layer" if own_mask else "identity"):
        y = model(x)
    (y * g).sum().backward()

    cfg = layer.config if own_mask else SVFConfig("identity", True)
    a2 = alpha.detach().clone().requires_grad_(True)
    Z2 = Z.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ys = [x2[b] @ dense_weight(layer.U, layer.S, layer.Vh, a2[b] @ Z2, cfg).T + lin.bias for b in range(B)]
    (torch.stack(ys) * g).sum().backward()
    assert rel(y, torch.stack(ys)) <= 1e-12
    assert rel(alpha.grad, a2.grad) <= 1e-10
    assert rel(layer.experts.grad, Z2.grad) <= 1e-10
    assert rel(x.grad, x2.grad) <= 1e-10


def test_one_hot_alpha_reproduces_each_expert():
    lin, layer = make(6, 8, torch.float64)
    Z = torch.randn(2, layer.rank, dtype=torch.float64)
    layer.set_experts(Z)
    model, x = One(layer), torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad(), mix_experts(model, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)):
        y = model(x)
    for b, k in ((0, 1), (1, 0)):
        with torch.no_grad():
            layer.z.copy_(Z[k])
            assert rel(y[b], layer(x[b])) < 1e-13


def test_merge_equals_the_dense_formulation():
    lin, layer = make(9, 6, torch.float64)
    with torch.no_grad():
        layer.z.copy_(torch.randn(layer.rank, dtype=torch.float64))
    merged = layer.to_module()
    assert type(merged) is nn.Linear
    assert rel(merged.weight, dense_weight(layer.U, layer.S, layer.Vh, layer.z, layer.config)) < 1e-13
    assert torch.equal(merged.bias, lin.bias)
    x = torch.randn(4, 9, dtype=torch.float64)
    assert rel(merged(x), layer(x)) < 1e-12


def test_merge_of_a_model_restores_requires_grad_and_takes_a_mixture():
    lin, layer = make(9, 6, torch.float64)
    model = nn.Sequential(nn.Linear(9, 9).double(), lin)
    names = svf.to_svf(model, preset=None, include=["1"], svd_dtype=torch.float64)
    assert names == ["1"] and not model[0].weight.requires_grad and model[1].z.requires_grad
    Z = torch.randn(2, 6, dtype=torch.float64)
    svf.set_experts(model, [{"1": Z[0]}, {"1": Z[1]}])
    alpha = torch.tensor([0.25, 0.75], dtype=torch.float64)
    want = dense_weight(model[1].U, model[1].S, model[1].Vh, alpha @ Z, model[1].config)
    assert svf.merge(model, alpha) == ["1"]
    assert type(model[1]) is nn.Linear and rel(model[1].weight, want) < 1e-13
    assert model[0].weight.requires_grad and model[1].weight.requires_grad


def test_bad_inputs_raise_clear_errors():
    lin, layer = make(6, 8, torch.float64)
    model = One(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="no SVF layer of this model holds experts"):
        with mix_experts(model, torch.ones(3, 2, dtype=torch.float64)):
            pass
    with pytest.raises(ValueError, match=r"experts must be a \(K, r=6\) tensor"):
        layer.set_experts(torch.randn(2, 5))
    layer.set_experts(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha has K=3 columns but the layers hold \\[2\\] experts"):
        with mix_experts(model, torch.ones(3, 3, dtype=torch.float64)):
            pass
    with pytest.raises(ValueError, match="floating-point \\(B, K\\)"):
        with mix_experts(model, torch.ones(3, dtype=torch.float64)):
            pass
    with pytest.raises(ValueError, match="floating-point \\(B, K\\)"):
        with mix_experts(model, torch.ones(3, 2, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="alpha has B=2 rows .* first dim must be the batch"):
        with mix_experts(model, torch.ones(2, 2, dtype=torch.float64)):
            model(x)
    with pytest.raises(ValueError, match="mask must be 'layer' or 'identity'"):
        with mix_experts(model, torch.ones(3, 2, dtype=torch.float64), mask="softmax"):
            pass
    with pytest.raises(ValueError, match="mask must be one of"):
        SVFConfig("tanh")
    with pytest.raises(ValueError, match="max_mult"):
        SVFConfig("sigmoid", True, 0)
    with pytest.raises(ValueError, match=r"z must be \(r,\) or \(B, r\) with r=6"):
        layer.scale(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has shape"):
        layer(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected nn.Linear or a Hugging Face Conv1D"):
        SVFLinear.from_module(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="do not match the weight"):
        SVFLinear.from_module(lin, factors=(torch.zeros(8, 5), torch.ones(5), torch.zeros(5, 7)))
    seq = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="choose layers with preset=, include= or filter_fn="):
        svf.to_svf(seq, preset=None)
    with pytest.raises(ValueError, match="config.model_type is None"):
        svf.to_svf(seq)
    with pytest.raises(ValueError, match="unknown preset 'falcon'"):
        svf.to_svf(seq, preset="falcon")
    svf.to_svf(seq, preset=None, include=["0"])
    with pytest.raises(ValueError, match="state has layers"):
        svf.load_z_state(seq, {"1": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"z of shape \(3,\), expected \(4,\)"):
        svf.set_experts(seq, [{"0": torch.zeros(3)}])
    with pytest.raises(ValueError, match="alpha must be \\(K,\\)"):
        svf.set_experts(seq, [{"0": torch.zeros(4)}])
        svf.merge(seq, torch.ones(2))
