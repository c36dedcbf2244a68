"""`Tent` (Wang et al., 2021): entropy minimisation of the normalisation layers' affine parameters.

The baseline of docs/design.md §6, with the same call as `IMSE`: `logits = adapter(x)` predicts and takes
one update (per step) on the mean softmax entropy of the batch; `reset()` restores the start state.
LayerNorm/GroupNorm affine parameters are trained; BatchNorm layers also use batch statistics, as
in the original. Everything else (including spectral `s`) is frozen.
"""
import copy
from typing import Optional

import torch
from torch import Tensor, nn

from ..losses import softmax_entropy

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class Tent:
    def __init__(self, model: nn.Module, lr: float = 1e-3, optimizer: str = "adam", momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, steps: int = 1,
                 episodic: bool = False) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"Tent: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if not lr > 0 or not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"Tent: need lr > 0 and an int steps >= 1, got lr={lr}, steps={steps}")
        self.model, self.steps, self.episodic = model, steps, episodic
        model.train()
        model.requires_grad_(False)
        params = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
            if isinstance(m, _NORMS):
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, nn.Parameter):
                        p.requires_grad_(True)
                        params.append(p)
        if not params:
            raise ValueError("Tent: the model has no normalisation layer with affine parameters")
        self.params = params
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._start_params = [p.detach().clone() for p in params]
        self._start_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.skipped_steps = 0

    def __call__(self, x: Tensor) -> Tensor:
        if self.episodic:
            self.reset()
        logits: Optional[Tensor] = None
        for _ in range(self.steps):
            logits = self._step(x)
        return logits

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        loss = softmax_entropy(logits).mean()
        loss.backward()
        norms = [p.grad.norm() for p in self.params if p.grad is not None]
        health = loss.detach() + (torch.stack(norms).sum() if norms else 0.0)  # NaN/inf anywhere shows here
        if bool(torch.isfinite(health)):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    @torch.no_grad()
    def reset(self) -> None:
        """Normalisation parameters and optimizer back to their start values."""
        for p, p0 in zip(self.params, self._start_params):
            p.copy_(p0)
        self.optimizer.load_state_dict(copy.deepcopy(self._start_optimizer))
