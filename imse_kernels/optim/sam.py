"""Sharpness-Aware Minimization (Foret et al., 2021) around any base optimizer, as IMSE and SAR use it.

One SAM update is two forward/backward passes on the same batch:
    loss(w).backward();      sam.first_step(zero_grad=True)    # w ← w + ρ·g/‖g‖   (ascend)
    loss(w + e).backward();  sam.second_step(zero_grad=True)   # w ← w, then base step with ∇loss(w + e)
`adaptive=True` scales the ascent per element by |w| (ASAM). `unperturb()` undoes a first step without
an update (used when the second pass is not finite).
"""
from typing import Callable, Optional

import torch
from torch import Tensor


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

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """‖g‖₂ over every parameter with a gradient (‖|w|·g‖₂ when adaptive)."""
        device = self.param_groups[0]["params"][0].device
        norms = [((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(device)
                 for group, p in self._perturbed()]
        if not norms:
            return torch.zeros((), device=device)
        return torch.linalg.vector_norm(torch.stack(norms), ord=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e(w), e(w) = ρ·g/(‖g‖ + 1e-12), remembering w."""
        scale_all = 1.0 / (self.grad_norm() + 1e-12)
        for group, p in self._perturbed():
            state = self.state[p]
            if "old_p" in state and state["old_p"].shape == p.shape:
                state["old_p"].copy_(p)  # reuse the buffer: repeated steps allocate nothing
            else:
                state["old_p"] = p.detach().clone()
            state["perturbed"] = True
            e_w = (p * p if group["adaptive"] else 1.0) * p.grad * (group["rho"] * scale_all).to(p)
            p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        """Return every perturbed parameter to the w remembered by `first_step`."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state.get("perturbed"):
                    p.copy_(state["old_p"])
                    state["perturbed"] = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to w, then the base optimizer's step with the gradient taken at w + e(w)."""
        self.unperturb()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

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
