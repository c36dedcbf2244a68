"""`Tent` (Wang et al., 2021): entropy minimisation of the normalisation layers' affine parameters.

One update per batch on the mean softmax entropy, with Adam or SGD (`TentConfig.optim`) or a ready `optimizer=`;
everything else, spectral `s` included, is frozen (docs/design.md, section 6).
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..losses import softmax_entropy
from .method import Method
from .method_config import MethodConfig
from .parameters import configure_for_adaptation, norm_parameters

OPTIMS = ("adam", "sgd")
_OPTIMIZER_FIELDS = ("optim", "lr", "momentum", "nesterov", "betas", "weight_decay")


@dataclass
class TentConfig(MethodConfig):
    """Tent's settings: Adam, lr 1e-3 (the official CIFAR setting, github.com/DequanWang/tent cfgs; its
    ImageNet one is SGD, lr 0.00025, momentum 0.9).

    optim              "adam" or "sgd": the optimizer Tent builds over the normalisation parameters.
    lr, lr_scaling, lr_batch1_factor, batch_size   learning rate at batch 64 and its batch scaling
                       (`tta.lr_scaling`; Tent's code scales nothing: "none").
    momentum, nesterov, betas   SGD's momentum and Nesterov flag, Adam's betas (each ignored by the other
                       optimizer). The original Tent's SGD (and the ViT-B/16 ImageNet-C setting of the IMSE and
                       ViDA comparisons, configs/imagenet_c/tent.yaml) is Nesterov; the SAR repository's is not.
    weight_decay       of either optimizer.
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    optim: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    def check(self) -> None:
        self.need(self.optim in OPTIMS,
                  f"optim (the optimizer Tent builds) must be 'adam' or 'sgd', got {self.optim!r}")
        self.need_fraction("momentum")
        self.need(not (self.nesterov and self.optim == "sgd") or self.momentum > 0,
                  "nesterov=True needs momentum > 0 (or set nesterov=False)")
        self.need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                  f"betas must be two values in [0, 1), got {self.betas}")
        self.need_non_negative("weight_decay")


class Tent(Method):
    """Tent(model, config=None, *, compile=False, optimizer=None, **fields); `fields` are `TentConfig` fields
    (e.g. `Tent(model, optim="sgd", lr=1e-3)`).

    optimizer   None: Tent builds `config.optim` over the normalisation parameters. A `torch.optim.Optimizer`:
                its parameters (which must be the model's) are the trained ones and its settings are used as
                they are; the optimizer fields of the config (optim, lr, momentum, nesterov, betas,
                weight_decay) must then not be given. The strings "adam"/"sgd" are the deprecated spelling of `optim=`.
    compile     False, True, a backend name or a dict of `torch.compile` keywords: forward + loss compiled
                (batch dimension dynamic), the update eager; the finiteness check reads one flag (a sync).
    `adapter.train()` / `eval()` leave the model in train mode (see `tta.adapter`); adaptation goes on.
    """

    kind = "Tent"
    config_class = TentConfig
    takes_optimizer = True

    def __init__(self, model: nn.Module, config: Optional[TentConfig] = None, *, compile: "bool | str | dict" = False,
                 optimizer: "Optional[torch.optim.Optimizer | str]" = None, **fields) -> None:
        if isinstance(optimizer, str):
            if "optim" in fields:
                raise ValueError("Tent: give the optimizer kind once, as optim=")
            warnings.warn(f"Tent(optimizer={optimizer!r}) is deprecated: write Tent(model, optim={optimizer!r}) "
                          "or pass a ready torch.optim.Optimizer as `optimizer`", DeprecationWarning, stacklevel=2)
            optimizer, fields = None, dict(fields, optim=optimizer)
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"Tent: optimizer must be None or a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}")
            given = [k for k in _OPTIMIZER_FIELDS if k in fields]
            if given:
                raise ValueError(f"Tent: {', '.join(given)} configure the optimizer Tent builds; with a ready "
                                 "optimizer set them on it")
        super().__init__(model, config, optimizer=optimizer, compile=compile, **fields)

    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        configure_for_adaptation(model)
        ready = self._given_optimizer
        if ready is None:
            return norm_parameters(model, "Tent")
        params = [p for g in ready.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        foreign = [i for i, p in enumerate(params) if id(p) not in names]
        if foreign:
            raise ValueError(f"Tent: the optimizer's parameters {foreign[:6]} (in group order) are not the model's")
        if not params:
            raise ValueError("Tent: the optimizer holds no parameters")
        return [(names[id(p)], p) for p in params]

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optim == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)

    def _compile_target(self):
        return self._forward_loss

    def _forward_loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        return logits, softmax_entropy(logits).mean()

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        logits, loss = self._call(x)
        self._update(loss)
        return logits.detach()
