"""SAM against the update written out by hand."""
import copy

import pytest
import torch

from imse_kernels.optim import SAM

A = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def loss_fn(p1, p2):
    return ((A @ p1 - 1.0) ** 2).sum() + torch.sin(3 * p2).sum() + (p1[:3] * p2[:, 0]).sum()


def make_params():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_()]


def sam_steps_by_hand(params, n, rho, lr, betas=(0.9, 0.999), eps=1e-8, adaptive=False):
    p = [q.detach().clone() for q in params]
    m = [torch.zeros_like(q) for q in p]
    v = [torch.zeros_like(q) for q in p]
    for t in range(1, n + 1):
        w = [q.clone().requires_grad_() for q in p]
        g = torch.autograd.grad(loss_fn(*w), w)
        scaled = [(q.abs() * gi if adaptive else gi) for q, gi in zip(p, g)]
        norm = torch.sqrt(sum((s ** 2).sum() for s in scaled))
        e = [((q * q) if adaptive else 1.0) * gi * rho / (norm + 1e-12) for q, gi in zip(p, g)]
        w2 = [(q + ei).requires_grad_() for q, ei in zip(p, e)]
        g2 = torch.autograd.grad(loss_fn(*w2), w2)
        for i, gi in enumerate(g2):  # Adam
            m[i] = betas[0] * m[i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            mhat, vhat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            p[i] = p[i] - lr * mhat / (vhat.sqrt() + eps)
    return p


def run_sam(opt, params, n):
    for _ in range(n):
        loss_fn(*params).backward()
        opt.first_step(zero_grad=True)
        loss_fn(*params).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_pass_update_matches_hand_written(adaptive):
    params = make_params()
    expected = sam_steps_by_hand(params, 3, rho=0.05, lr=0.01, adaptive=adaptive)
    opt = SAM(params, torch.optim.Adam, rho=0.05, adaptive=adaptive, lr=0.01, betas=(0.9, 0.999))
    run_sam(opt, params, 3)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_first_step_ascends_by_rho_and_unperturb_restores_exactly():
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1)
    loss_fn(*params).backward()
    opt.first_step()
    moved = torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(params, start)))
    assert moved.item() == pytest.approx(0.1, rel=1e-9)
    opt.unperturb()
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    opt.unperturb()  # a second call is a no-op
    assert all(torch.equal(p, s) for p, s in zip(params, start))


def test_closure_step_equals_explicit_steps():
    a, b = make_params(), make_params()
    opt_a = SAM(a, torch.optim.Adam, lr=0.01)
    opt_b = SAM(b, torch.optim.Adam, lr=0.01)
    run_sam(opt_a, a, 2)
    for _ in range(2):
        loss_fn(*b).backward()

        def closure():
            loss = loss_fn(*b)
            loss.backward()
            return loss
        opt_b.step(closure)
        opt_b.zero_grad()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="closure"):
        opt_b.step()


def test_state_dict_round_trip_continues_identically():
    a = make_params()
    opt_a = SAM(a, torch.optim.Adam, rho=0.05, lr=0.01)
    run_sam(opt_a, a, 2)
    saved_params = [p.detach().clone() for p in a]
    saved_state = copy.deepcopy(opt_a.state_dict())  # like torch optimizers, it references live state
    assert saved_state["param_groups"][0]["rho"] == 0.05 and len(saved_state["state"]) == 2
    run_sam(opt_a, a, 2)

    b = [p.clone().requires_grad_() for p in saved_params]
    opt_b = SAM(b, torch.optim.Adam, rho=0.05, lr=0.01)
    opt_b.load_state_dict(saved_state)
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    run_sam(opt_b, b, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_lr_change_reaches_the_base_optimizer_and_bad_args_raise():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["lr"] = 0.5
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)


def test_deepcopy_keeps_the_base_optimizer_and_its_state():
    """copy.deepcopy (e.g. of an IMSE adapter) must copy the base optimizer too, bound to the copied params."""
    params = make_params()
    sam = SAM(params, torch.optim.Adam, rho=0.05, lr=1e-2)

    def step(opt, ps):
        loss_fn(*ps).backward()
        opt.first_step(zero_grad=True)
        loss_fn(*ps).backward()
        opt.second_step(zero_grad=True)

    step(sam, params)
    twin_params, twin = copy.deepcopy((params, sam))
    assert twin.param_groups is twin.base_optimizer.param_groups
    assert all(p is q for p, q in zip(twin.param_groups[0]["params"], twin_params))
    step(sam, params)
    step(twin, twin_params)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q) and p is not q
    assert int(twin.state_dict()["state"][0]["step"]) == 2
