"""`Tent` (Wang et al., 2021): entropy minimisation of the normalisation layers' affine parameters.

The baseline of docs/design.md §6, with the same call as `IMSE`: `logits = adapter(x)` predicts and takes
one update (per step) on the mean softmax entropy of the batch; `reset()` restores the start state.
By default LayerNorm/GroupNorm/BatchNorm affine parameters are trained with Adam or SGD (`optim=`); a
ready `torch.optim.Optimizer` over any of the model's parameters may be passed instead. BatchNorm
layers use batch statistics, as in the original. Everything else (including spectral `s`) is frozen.
`compile=` runs forward + loss through `torch.compile` (batch dimension dynamic), as IMSE's (docs/design.md §6);
the finiteness check of the update still reads one flag on the host.
`Tent` is an `nn.Module` holding the model as `self.model`; `state_dict()` carries the whole adaptation
state (model, optimizer, start values, counters; see `tta.adapter`).
"""
import copy
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..losses import softmax_entropy
from .adapter import Adapter, AdapterStateError, check_optimizer_state, differences

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
OPTIMS = ("adam", "sgd")


def compile_fn(fn, option, who: str = "adapter"):
    """`fn` through `torch.compile` as `option` says (docs/design.md §6, compiled step): False/None: None (eager);
    True: torch.compile defaults (inductor); a str: that backend; a dict: `torch.compile` keywords."""
    if option is None or option is False:
        return None
    if option is True:
        kw = {}
    elif isinstance(option, str):
        kw = {"backend": option}
    elif isinstance(option, dict):
        kw = dict(option)
    else:
        raise TypeError(f"{who}: compile must be a bool, a backend name or a dict of torch.compile keywords, "
                        f"got {type(option).__name__}")
    return torch.compile(fn, **kw)


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters (weight, bias) of every LayerNorm, GroupNorm and BatchNorm in `model`."""
    params = []
    for m in model.modules():
        if isinstance(m, _NORMS):
            params += [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
    return params


class Tent(Adapter):
    """Tent(model, optimizer=None, *, optim="adam", lr=1e-3, momentum=0.9, betas=(0.9, 0.999),
    weight_decay=0.0, steps=1, episodic=False, compile=False).

    optimizer   None: Tent builds `optim` ("adam" or "sgd") over the normalisation parameters with
                lr, momentum (SGD), betas (Adam) and weight_decay. A `torch.optim.Optimizer`: its
                parameters (which must be the model's) are the trained ones, its settings are used as
                they are (then lr, momentum, betas, weight_decay and optim must not be given).
                momentum applies to SGD only, betas to Adam only (the other is ignored).
                The strings "adam"/"sgd" are the deprecated spelling of `optim=`.
    steps, episodic   updates per batch; restore the start state before every batch.
    compile     False, True, a backend name or a dict of `torch.compile` keywords: forward + loss compiled
                (batch dimension dynamic), the update eager; the finiteness check reads one flag (a sync).
    `adapter.train()` / `eval()` leave the model in train mode (see `tta.adapter`); adaptation goes on.
    """

    kind = "Tent"

    def __init__(self, model: nn.Module, optimizer: "Optional[torch.optim.Optimizer | str]" = None, *,
                 optim: Optional[str] = None, lr: Optional[float] = None, momentum: Optional[float] = None,
                 betas: Optional[tuple[float, float]] = None, weight_decay: Optional[float] = None,
                 steps: int = 1, episodic: bool = False, compile: "bool | str | dict" = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Tent: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(optimizer, str):
            if optim is not None:
                raise ValueError("Tent: give the optimizer kind once, as optim=")
            warnings.warn(f"Tent(optimizer={optimizer!r}) is deprecated: write Tent(model, optim={optimizer!r}) "
                          "or pass a ready torch.optim.Optimizer as `optimizer`", DeprecationWarning, stacklevel=2)
            optimizer, optim = None, optimizer
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"Tent: steps must be an int >= 1, got {steps}")
        if optimizer is None:
            optim = "adam" if optim is None else optim
            lr = 1e-3 if lr is None else lr
            if optim not in OPTIMS:
                raise ValueError(f"Tent: optimizer (optim) must be 'adam' or 'sgd', got {optim!r}")
            if not lr > 0:
                raise ValueError(f"Tent: need lr > 0, got lr={lr}")
        elif isinstance(optimizer, torch.optim.Optimizer):
            given = [k for k, v in dict(optim=optim, lr=lr, momentum=momentum, betas=betas,
                                        weight_decay=weight_decay).items() if v is not None]
            if given:
                raise ValueError(f"Tent: {', '.join(given)} configure the optimizer Tent builds; with a ready "
                                 "optimizer set them on it")
        else:
            raise TypeError(f"Tent: optimizer must be None or a torch.optim.Optimizer, got {type(optimizer).__name__} "
                            "(lr and the other settings are keyword arguments)")
        self.model, self.steps, self.episodic = model, steps, episodic
        model.train()
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
        if optimizer is None:
            params = norm_parameters(model)
            if not params:
                raise ValueError("Tent: the model has no normalisation layer with affine parameters")
            wd = 0.0 if weight_decay is None else weight_decay
            if optim == "adam":
                optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999) if betas is None else betas,
                                             weight_decay=wd)
            else:
                optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9 if momentum is None else momentum,
                                            weight_decay=wd)
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        foreign = [i for i, p in enumerate(self.params) if id(p) not in names]
        if foreign:
            raise ValueError(f"Tent: the optimizer's parameters {foreign[:6]} (in group order) are not the model's")
        if not self.params:
            raise ValueError("Tent: the optimizer holds no parameters")
        self.param_names = [names[id(p)] for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        self._start_params = [p.detach().clone() for p in self.params]
        self._start_optimizer = copy.deepcopy(optimizer.state_dict())
        self.skipped_steps = 0
        self.steps_taken = 0
        self._compiled = compile_fn(self._forward_loss, compile, "Tent")

    def forward(self, x: Tensor) -> Tensor:
        """Predict `x` (logits of the first step's forward, detached) and adapt."""
        if self.episodic:
            self.reset()
        logits: Optional[Tensor] = None
        for _ in range(self.steps):
            logits = self._step(x)
        return logits

    def _forward_loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return logits, softmax_entropy(logits).mean()

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        if self._compiled is None:
            logits, loss = self._forward_loss(x)
        else:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            logits, loss = self._compiled(x)
        self._update(loss)
        return logits.detach()

    def _update(self, loss: Tensor) -> None:
        """Backward `loss` and step the optimizer, unless the loss or a gradient is not finite (then the
        step is skipped and counted); one host sync. The subclasses' steps end here too."""
        loss.backward()
        norms = [p.grad.norm() for p in self.params if p.grad is not None]
        health = loss.detach() + (torch.stack(norms).sum() if norms else 0.0)  # NaN/inf anywhere shows here
        if bool(torch.isfinite(health)):
            self.optimizer.step()
            self.steps_taken += 1
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def reset(self) -> None:
        """Trained parameters, optimizer and counters back to their start values."""
        for p, p0 in zip(self.params, self._start_params):
            p.copy_(p0)
        self.optimizer.load_state_dict(copy.deepcopy(self._start_optimizer))
        self.skipped_steps = self.steps_taken = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _settings(self) -> dict:
        return {"optimizer": type(self.optimizer).__name__, "steps": self.steps, "episodic": self.episodic,
                "params": list(self.param_names)}

    def _adaptation_state(self) -> dict:
        """settings (optimizer class, steps, episodic, trained parameter names), counters, optimizer state and
        the start values `reset()` returns to."""
        return {"config": self._settings(),
                "counters": {"steps_taken": self.steps_taken, "skipped_steps": self.skipped_steps},
                "optimizer": self.optimizer.state_dict(), "start_params": list(self._start_params),
                "start_optimizer": self._start_optimizer}

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            found, want = state["config"], self._settings()
            if found != want:
                raise AdapterStateError(f"Tent: the state was saved with other settings: "
                                        f"{'; '.join(differences(found, want))}")
            starts = state["start_params"]
            if [tuple(t.shape) for t in starts] != [tuple(p.shape) for p in self.params]:
                raise AdapterStateError("Tent: the state's start values do not match the trained parameters' shapes")
            counters = state["counters"]
            if not all(isinstance(counters[k], int) for k in ("steps_taken", "skipped_steps")):
                raise AdapterStateError(f"Tent: malformed counters in the state: {counters!r}")
            check_optimizer_state(state["optimizer"], self.optimizer, "Tent")
            check_optimizer_state(state["start_optimizer"], self.optimizer, "Tent (start)")
        except KeyError as err:
            raise AdapterStateError(f"Tent: the adapter state lacks {err}") from err

    def _load_adaptation_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._start_params = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(state["start_params"], self.params)]
        self._start_optimizer = state["start_optimizer"]
        self.steps_taken = state["counters"]["steps_taken"]
        self.skipped_steps = state["counters"]["skipped_steps"]
