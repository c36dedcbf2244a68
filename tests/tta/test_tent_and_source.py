"""Tent and Source: same call as IMSE; Tent's step against plain PyTorch."""
import math

import pytest
import torch
from helpers import tiny_vit
from torch import nn

from imse_kernels.tta import IMSE, IMSEConfig, Source, Tent


def norm_params(model):
    return {n: p for n, p in model.named_parameters() if ".norm" in n or n.startswith("norm")}


def entropy_grads(model, x):
    out = model(x)
    loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
    params = norm_params(model)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())))), out.detach()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tent_step_matches_hand_written(optimizer):
    model = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    for p in model.parameters():
        p.requires_grad_(True)
    grads, expected_out = entropy_grads(model, x)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tent = Tent(model, optim=optimizer, lr=1e-3)
    out = tent(x)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for n, p in model.named_parameters():
        if n in grads:
            g = grads[n]
            # Adam's first step is lr·g/(|g|+eps); SGD with momentum starts with buf = g
            expected = start[n] - 1e-3 * (g / (g.abs() + 1e-8) if optimizer == "adam" else g)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(p.detach(), start[n]) and not p.requires_grad, n
    assert len(grads) == 2 * (2 * 4 + 1)  # norm1, norm2 per block and the final norm: weight and bias


def test_tent_reset_non_finite_and_bad_args():
    model = tiny_vit()
    tent = Tent(model, lr=1e-3)
    start = {n: p.detach().clone() for n, p in norm_params(model).items()}
    bad = torch.randn(4, 3, 32, 32)
    bad[0] = float("nan")
    tent(bad)
    assert tent.skipped_steps == 1 and all(torch.equal(p, start[n]) for n, p in norm_params(model).items())
    tent(torch.randn(4, 3, 32, 32))
    assert any(not torch.equal(p, start[n]) for n, p in norm_params(model).items())
    tent.reset()
    assert all(torch.equal(p, start[n]) for n, p in norm_params(model).items())
    assert tent.optimizer.state_dict()["state"] == {}
    with pytest.raises(ValueError, match="optimizer"):
        Tent(tiny_vit(), optim="rmsprop")
    with pytest.raises(TypeError, match="keyword"):
        Tent(tiny_vit(), 1e-3)  # the second argument is the config; settings are keywords
    with pytest.raises(ValueError, match="normalisation"):
        Tent(nn.Sequential(nn.Linear(3, 3)))


def test_tent_old_optimizer_string_warns_and_works_the_same():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    new = Tent(tiny_vit(), optim="sgd", lr=1e-3)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="optim='sgd'"):
        old = Tent(tiny_vit(), optimizer="sgd", lr=1e-3)
    assert isinstance(old.optimizer, torch.optim.SGD)
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="once"):
        Tent(tiny_vit(), optimizer="adam", optim="adam")


def test_tent_takes_a_ready_optimizer():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    built = Tent(tiny_vit(), lr=1e-3)
    torch.manual_seed(0)
    model = tiny_vit()
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if ".norm" in n or n.startswith("norm")], lr=1e-3)
    given = Tent(model, optimizer=opt)
    assert given.optimizer is opt and given.param_names == [n for n, _ in norm_params(model).items()]
    torch.testing.assert_close(given(x), built(x), rtol=0, atol=0)
    torch.testing.assert_close(given(x), built(x), rtol=0, atol=0)
    # any parameters of the model the user chose: here only the head's bias
    model = tiny_vit()
    tent = Tent(model, optimizer=torch.optim.SGD([model.head.bias], lr=0.1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tent(x)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert changed == ["head.bias"] and tent.param_names == ["head.bias"]
    tent.reset()
    assert torch.equal(model.head.bias.detach(), start["head.bias"])
    with pytest.raises(ValueError, match="lr"):
        Tent(tiny_vit(), optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), lr=1e-3)
    with pytest.raises(ValueError, match="not the model's"):
        Tent(tiny_vit(), optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))


def test_source_is_the_frozen_model():
    model = tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    src = Source(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    out = src(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not out.requires_grad
    src.reset()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_adapters_are_interchangeable():
    x = torch.randn(4, 3, 32, 32)
    for make in (Source, lambda m: Tent(m, lr=1e-4), lambda m: IMSE(m, IMSEConfig(stats_window=4))):
        adapter = make(tiny_vit())
        logits = adapter(x)
        assert logits.shape == (4, 10) and torch.isfinite(logits).all() and not logits.requires_grad
        adapter.reset()
        assert math.isfinite(float(adapter(x).sum()))
