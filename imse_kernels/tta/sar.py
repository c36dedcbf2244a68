"""`SAR` (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023).

Sharpness-aware, reliable entropy minimisation with model recovery, after the official code
(github.com/mr-eggplant/SAR at 20f6e24: sar.py `forward_and_adapt_sar`, `collect_params`, `SAR.forward`,
`SAR.reset`; sam.py; main.py for the ViT-B/16 settings). The step, the recovery (SGD's momentum survives it, as
in the authors' code) and the deliberate differences: docs/design.md, sections 11 and 12.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..losses import entropy_threshold, reliable_entropy, softmax_entropy
from ..optim import SAM
from .adapter import AdapterStateError
from .method import Method
from .method_config import MethodConfig
from .parameters import block_norm_parameters, configure_for_adaptation


@dataclass
class SARConfig(MethodConfig):
    """Official ViT-B/16 ImageNet-C settings, batch 64 (mr-eggplant/SAR @20f6e24).

    lr, momentum       SGD inside SAM: lr at batch 64 (main.py lines 191–193: 0.001 / 64 · batch for
                       vitbase_timm), momentum 0.9 (main.py line 291).
    lr_scaling, lr_batch1_factor, batch_size   the authors' batch scaling (`tta.lr_scaling`): "linear",
                       doubled at batch 1 (main.py lines 205–207); batch_size None: lr as given.
    rho                SAM radius (sam.py line 9 default, not adaptive).
    entropy_margin     E0 = entropy_margin · ln C (main.py line 107: 0.4 · ln 1000).
    reset_constant     recover when the EMA of the loss is below this (sar.py lines 27, 102: 0.2).
    ema_momentum       EMA ← m · EMA + (1 − m) · loss (sar.py line 20: 0.9).
    frozen_blocks      the last blocks not adapted (sar.py lines 121–130: blocks 9–11 of 12, and `norm`).
    recovery_clears_momentum   False (the authors'): a recovery keeps SGD's momentum (module doc); True: a
                       recovery also restores the optimizer's start state.
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    lr: float = 1e-3
    lr_scaling: str = "linear"
    lr_batch1_factor: float = 2.0
    momentum: float = 0.9
    rho: float = 0.05
    entropy_margin: float = 0.4
    reset_constant: float = 0.2
    ema_momentum: float = 0.9
    frozen_blocks: int = 3
    recovery_clears_momentum: bool = False

    def check(self) -> None:
        self.need_fraction("momentum", "ema_momentum")
        self.need_non_negative("rho")
        self.need(self.entropy_margin > 0,
                  f"entropy_margin must be > 0 (a fraction of ln C), got {self.entropy_margin}")
        self.need(self.reset_constant >= 0, f"reset_constant must be >= 0 (0 turns recovery off), got "
                                            f"{self.reset_constant}")
        self.need_at_least("frozen_blocks", 0)


class SAR(Method):
    """SAR(model, config=None, *, compile=False, **fields): adapts `model` (in place, train mode) on every call;
    see the module doc. `compile=` compiles the model's forward (both SAM passes use it).

    `ema` is the moving average of the loss (None until a batch has a reliable sample), `recoveries` the
    number of model recoveries, `param_names` the trained parameters.
    """

    kind = "SAR"
    config_class = SARConfig

    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        configure_for_adaptation(model)
        return block_norm_parameters(model, self.config.frozen_blocks, "SAR")

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return SAM(params, torch.optim.SGD, rho=self.config.rho, lr=self.lr, momentum=self.config.momentum)

    def _setup(self) -> None:
        self.ema: Optional[float] = None
        self.recoveries = 0

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        cfg, opt = self.config, self.optimizer
        opt.zero_grad(set_to_none=True)
        logits = self._call(x)
        e0 = entropy_threshold(logits.shape[1], cfg.entropy_margin)
        entropy = softmax_entropy(logits)
        reliable = entropy.detach() < e0
        loss = reliable_entropy(entropy, reliable)
        loss.backward()
        norm = opt.grad_norm()
        if not bool(torch.isfinite(loss.detach() + norm)):
            return self._skip(logits)
        opt.first_step(zero_grad=True, grad_norm=norm)  # w + e(w)
        entropy2 = softmax_entropy(self._call(x))
        reliable2 = reliable & (entropy2.detach() < e0)  # filtered again at the perturbed weights
        loss2 = reliable_entropy(entropy2, reliable2)
        loss2.backward()
        if not bool(torch.isfinite(loss2.detach() + opt.grad_norm())):
            opt.unperturb()
            return self._skip(logits)
        if bool(reliable2.any()):
            value = float(loss2.detach())
            self.ema = value if self.ema is None else cfg.ema_momentum * self.ema + (1 - cfg.ema_momentum) * value
        opt.second_step(zero_grad=True)  # back to w, SGD step with the gradient at w + e(w)
        self._count(True)
        if self.ema is not None and self.ema < cfg.reset_constant:
            self._recover()
        return logits.detach()

    def _skip(self, logits: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self._count(False)
        return logits.detach()

    def _recover(self) -> None:
        """Model recovery (module doc): trained parameters to their start values; SGD's momentum stays unless
        `recovery_clears_momentum`; the EMA and the counters stay."""
        self._restore_start(optimizer=self.config.recovery_clears_momentum)
        self.recoveries += 1

    def _episode_start(self) -> None:
        """The authors' `reset()` before every batch: start values, EMA cleared, SGD's momentum as in `_recover`."""
        self._restore_start(optimizer=self.config.recovery_clears_momentum)
        self.ema = None

    def _reset_state(self) -> None:
        self.ema = None

    def _reset_counters(self) -> None:
        self.recoveries = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _method_state(self) -> dict:
        return {"ema": self.ema, "recoveries": self.recoveries}

    def _check_method_state(self, own) -> None:
        if not isinstance(own, dict) or not isinstance(own.get("recoveries"), int) \
                or not (own.get("ema") is None or isinstance(own.get("ema"), float)):
            raise AdapterStateError(f"SAR: malformed EMA/recoveries in the state: {own!r}")

    def _load_method_state(self, own: dict) -> None:
        self.ema, self.recoveries = own["ema"], own["recoveries"]
