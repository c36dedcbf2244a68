"""Sharpness-Aware Minimization (Foret et al., 2021) around any base optimizer, as IMSE and SAR use it.

One SAM update is two forward/backward passes on the same batch:
    loss(w).backward();      sam.first_step(zero_grad=True)    # w ← w + ρ·g/‖g‖   (ascend)
    loss(w + e).backward();  sam.second_step(zero_grad=True)   # w ← w, then base step with ∇loss(w + e)
`adaptive=True` scales the ascent per element by |w| (ASAM). `unperturb()` undoes a first step without
an update (used when the second pass is not finite).

Device-side skipping (docs/design.md §6, IMSE step): `first_step(ok=flag)` and `second_step(ok=flag)`
take a 0-dim bool tensor; where it is false the ascent, the Adam moments, the step count and the
parameters stay bitwise as they were, without reading the flag on the host. The arithmetic runs on
the parameter lists with `torch._foreach_*` ops. With `ok`, a `torch.optim.Adam` base (no amsgrad,
maximize or weight decay) is stepped by `_masked_adam_step`, which reproduces Adam's single-tensor
arithmetic (bias corrections in float64, rounded to the parameter dtype as Adam's Python scalars
are) on a step count kept on the parameter's device; other base optimizers read the flag once
(a host sync) and call their own `step()`.
"""
from typing import Callable, Optional

import torch
from torch import Tensor


def _finite_or_zero(ok: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """`tensors` where `ok`, else zeros: one cat, one where; views of the result, shaped as the inputs."""
    if not tensors:
        return []
    flat = torch.where(ok, torch.cat([t.reshape(-1) for t in tensors]), 0)
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class SAM(torch.optim.Optimizer):
    """SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs); kwargs go to the base optimizer."""

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, **kwargs) -> None:
        if not rho >= 0.0:
            raise ValueError(f"SAM: rho must be non-negative, got {rho}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"SAM: base_optimizer must be a torch.optim.Optimizer class, got {base_optimizer!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr changes reach both
        self.defaults.update(self.base_optimizer.defaults)

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles/copies only defaults, state and param_groups: keep the base optimizer
        return dict(super().__getstate__(), base_optimizer=self.base_optimizer)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.param_groups = self.base_optimizer.param_groups

    def _perturbed(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    def _with_grads(self):
        """(group, params with a gradient) per group that has any."""
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                yield group, ps

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """‖g‖₂ over every parameter with a gradient (‖|w|·g‖₂ when adaptive); foreach norms, no sync."""
        device = self.param_groups[0]["params"][0].device
        norms = []
        for group, ps in self._with_grads():
            gs = [p.grad for p in ps]
            if group["adaptive"]:
                gs = torch._foreach_mul(torch._foreach_abs(ps), gs)
            norms += [n.to(device) for n in torch._foreach_norm(gs, 2)]
        if not norms:
            return torch.zeros((), device=device)
        return torch.linalg.vector_norm(torch.stack(norms), ord=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, ok: Optional[Tensor] = None,
                   grad_norm: Optional[Tensor] = None) -> None:
        """Move to w + e(w), e(w) = ρ·g/(‖g‖ + 1e-12), remembering w. With `ok` (0-dim bool tensor) the
        move is made only where it is true (e = 0 otherwise, even for non-finite gradients);
        `grad_norm`: `self.grad_norm()` when the caller has it already."""
        scale_all = 1.0 / ((self.grad_norm() if grad_norm is None else grad_norm) + 1e-12)
        for group, ps in self._with_grads():
            olds = []
            for p in ps:
                state = self.state[p]
                if "old_p" not in state or state["old_p"].shape != p.shape:
                    state["old_p"] = torch.empty_like(p)
                state["perturbed"] = True
                olds.append(state["old_p"])
            torch._foreach_copy_(olds, ps)  # reuse the buffers: repeated steps allocate nothing
            gs = [p.grad for p in ps]
            c = (group["rho"] * scale_all).to(ps[0])
            if ok is not None:
                gs, c = _finite_or_zero(ok, gs), torch.where(ok, c, 0)
            e_w = torch._foreach_mul(torch._foreach_mul(ps, ps), gs) if group["adaptive"] else gs
            e_w = torch._foreach_mul(e_w, c)
            torch._foreach_add_(ps, e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        """Return every perturbed parameter to the w remembered by `first_step`."""
        ps, olds = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state.get("perturbed"):
                    ps.append(p)
                    olds.append(state["old_p"])
                    state["perturbed"] = False
        if ps:
            torch._foreach_copy_(ps, olds)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, ok: Optional[Tensor] = None) -> None:
        """Back to w, then the base optimizer's step with the gradient taken at w + e(w); with `ok`
        (0-dim bool tensor) the step is taken only where it is true."""
        self.unperturb()
        if ok is None:
            self.base_optimizer.step()
        elif self._maskable():
            self._masked_adam_step(ok)
        elif bool(ok):  # another base optimizer: one host sync
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _maskable(self) -> bool:
        return type(self.base_optimizer) is torch.optim.Adam and all(
            not g["amsgrad"] and not g["maximize"] and g["weight_decay"] == 0 and not g.get("differentiable")
            and not isinstance(g["lr"], Tensor) and not any(isinstance(b, Tensor) for b in g["betas"])
            for g in self.param_groups)

    @torch.no_grad()
    def _masked_adam_step(self, ok: Tensor) -> None:
        """torch.optim.Adam's update where `ok`, nothing (bitwise) elsewhere; foreach ops, no host sync.

        Adam (single tensor): m.lerp_(g, 1 − β1); v.mul_(β2).addcmul_(g, g, value=1 − β2);
        p.addcdiv_(m, v.sqrt() / √(1 − β2ᵗ) + eps, value=−lr/(1 − β1ᵗ)), the bias corrections in
        float64 and rounded to the parameter dtype as Adam's Python scalars are (bitwise equal to
        torch.optim.Adam on the CPU, tested). Masked: where `ok` is false the gradient is 0, the lerp
        weight 0, β2 → 1 and the step size 0, so every tensor keeps its value bitwise.
        """
        base = self.base_optimizer
        for group, ps in self._with_grads():
            b1, b2 = group["betas"]
            steps, ms, vs = [], [], []
            for p in ps:
                st = base.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif st["step"].device != p.device:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)  # a loaded (CPU) count
                steps.append(st["step"])
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
            dev, dt = ps[0].device, ps[0].dtype
            okd = ok.to(dev)
            gs = _finite_or_zero(okd, [p.grad for p in ps])
            torch._foreach_add_(steps, [okd.to(torch.float32)] * len(steps))  # the list form reads nothing back
            t = torch.stack(steps).to(torch.float64).clamp_min(1.0)  # a skipped first step keeps t finite
            neg_step = torch.where(okd, (-(group["lr"] / (1.0 - b1 ** t))).to(dt), 0)
            bc2_sqrt = (1.0 - b2 ** t).sqrt().to(dt)
            w1 = torch.where(okd, torch.full((), 1.0 - b1, dtype=dt, device=dev), 0)  # fills, no copies
            keep2 = torch.where(okd, torch.full((), b2, dtype=dt, device=dev), 1)
            torch._foreach_lerp_(ms, gs, [w1] * len(ms))
            torch._foreach_mul_(vs, keep2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)  # gs are zeros where not ok
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, list(bc2_sqrt.unbind()))
            torch._foreach_add_(denom, group["eps"])
            numer = torch._foreach_mul(ms, list(neg_step.unbind()))
            torch._foreach_addcdiv_(ps, numer, denom)  # p + (−lr/bc1)·m / denom, as Adam's addcdiv_(value=−step)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> None:
        """Both steps; `closure` must run a full forward and backward (at w + e(w))."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        torch.enable_grad()(closure)()
        self.second_step()

    def state_dict(self) -> dict:
        """The base optimizer's state (its param groups carry rho and adaptive); SAM's buffers are transient."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if "base_optimizer" in state_dict:  # the official code's layout
            state_dict = state_dict["base_optimizer"]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
