"""`SAR` (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023).

Sharpness-aware, reliable entropy minimisation with model recovery, after the official code
(github.com/mr-eggplant/SAR at 20f6e24: sar.py `forward_and_adapt_sar`, `collect_params`; main.py for the
ViT-B/16 settings). Per batch (`logits = adapter(x)`, the first forward's logits):
  1. H = softmax entropy; reliable set S1 = {H < E0}, E0 = entropy_margin · ln C (C = the logits' classes);
  2. SAM (`imse_kernels.optim.SAM` around SGD with momentum): backward of mean_{S1} H, ascend to w + ρ·g/‖g‖,
     forward again, S2 = S1 ∩ {H(w + e) < E0}, backward of mean_{S2} H(w + e), back to w, SGD step;
  3. EMA ← 0.9 · EMA + 0.1 · mean_{S2} H(w + e) (`ema_momentum`; only when S2 is not empty); when
     EMA < reset_constant the trained parameters and the optimizer go back to their start values ("model
     recovery", counted in `recoveries`). As in the official code the EMA itself survives a recovery (sar.py
     lines 49–52: its `reset()` clears it, then `self.ema = ema` puts it back); `adapter.reset()` clears it.
A batch without reliable samples has a zero gradient (the official empty mean: NaN value, zero gradient),
so SGD's momentum still moves the parameters, as in the official code. A loss or gradient that is not
finite otherwise skips the update (`skipped_steps`).

Trained parameters (official `collect_params`): the LayerNorm/GroupNorm/BatchNorm affine parameters of
every transformer block but the last `frozen_blocks` (blocks 9–11 of ViT-B's 12), not the final `norm`.
SAR is built on `Tent` (as the official code is on Tent's): its optimizer, start values, `reset()` and
state handling, with the step replaced.
"""
import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..losses import entropy_threshold, reliable_entropy, softmax_entropy
from ..optim import SAM
from .adapter import AdapterStateError
from .tent import _NORMS, Tent

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def block_index(name: str) -> Optional[int]:
    """i for a module or parameter under `blocks.<i>`, else None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def sar_parameters(model: nn.Module, frozen_blocks: int = 3, who: str = "SAR") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the normalisation affine parameters SAR and DeYO train in a ViT: those of every
    `blocks.<i>` but the last `frozen_blocks`, and of norms outside the blocks except the final `norm`
    (official SAR sar.py `collect_params`, lines 109–138: skips blocks.9–11 and `norm` of ViT-B/16)."""
    mods = list(model.named_modules())
    blocks = [b for n, _ in mods if (b := block_index(n)) is not None]
    if frozen_blocks > 0 and not blocks:
        raise ValueError(f"{who}: frozen_blocks={frozen_blocks} needs a ViT with `blocks.<i>` modules; this model has "
                         "none (set frozen_blocks=0 to adapt every normalisation layer but the final `norm`)")
    depth = max(blocks) + 1 if blocks else 0
    out = []
    for name, m in mods:
        if not isinstance(m, _NORMS):
            continue
        b = block_index(name)
        if (b is not None and b >= depth - frozen_blocks) or (b is None and name.split(".")[-1] == "norm"):
            continue
        out += [(f"{name}.{k}" if name else k, p) for k, p in m.named_parameters(recurse=False)
                if k in ("weight", "bias")]
    if not out:
        raise ValueError(f"{who}: no normalisation affine parameter to adapt (frozen_blocks={frozen_blocks} of "
                         f"{depth} blocks, the final norm excluded); lower frozen_blocks")
    return out


@dataclass
class SARConfig:
    """Official ViT-B/16 ImageNet-C settings, batch 64 (mr-eggplant/SAR @20f6e24).

    lr, momentum       SGD inside SAM; official lr = 0.001 · batch / 64 (main.py lines 191–193), momentum
                       0.9 (main.py line 291). Set lr for other batch sizes (the official doubles it at batch 1).
    rho                SAM radius (sam.py line 9 default, not adaptive).
    entropy_margin     E0 = entropy_margin · ln C (main.py line 107: 0.4 · ln 1000).
    reset_constant     recover when the EMA of the loss is below this (sar.py lines 27, 102: 0.2).
    ema_momentum       EMA ← m · EMA + (1 − m) · loss (sar.py line 20: 0.9).
    frozen_blocks      the last blocks not adapted (sar.py lines 121–130: blocks 9–11 of 12, and `norm`).
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    lr: float = 1e-3
    momentum: float = 0.9
    rho: float = 0.05
    entropy_margin: float = 0.4
    reset_constant: float = 0.2
    ema_momentum: float = 0.9
    frozen_blocks: int = 3
    steps: int = 1
    episodic: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"SARConfig: {msg}")

        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.rho >= 0, f"rho must be >= 0, got {self.rho}")
        need(self.entropy_margin > 0, f"entropy_margin must be > 0 (a fraction of ln C), got {self.entropy_margin}")
        need(self.reset_constant >= 0, f"reset_constant must be >= 0 (0 turns recovery off), got {self.reset_constant}")
        need(0 <= self.ema_momentum < 1, f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        need(isinstance(self.frozen_blocks, int) and self.frozen_blocks >= 0,
             f"frozen_blocks must be an int >= 0, got {self.frozen_blocks}")
        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps}")
        need(isinstance(self.episodic, bool), f"episodic must be a bool, got {self.episodic!r}")


class SAR(Tent):
    """SAR(model, config=None): adapts `model` (in place, train mode) on every call; see the module doc.

    `ema` is the moving average of the loss (None until a batch has a reliable sample), `recoveries` the
    number of model recoveries, `param_names` the trained parameters.
    """

    kind = "SAR"

    def __init__(self, model: nn.Module, config: Optional[SARConfig] = None) -> None:
        cfg = SARConfig() if config is None else config
        if not isinstance(cfg, SARConfig):
            raise TypeError(f"SAR: config must be a SARConfig, got {type(cfg).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"SAR: model must be an nn.Module, got {type(model).__name__}")
        params = [p for _, p in sar_parameters(model, cfg.frozen_blocks, "SAR")]
        optimizer = SAM(params, torch.optim.SGD, rho=cfg.rho, lr=cfg.lr, momentum=cfg.momentum)
        super().__init__(model, optimizer, steps=cfg.steps, episodic=cfg.episodic)
        self.config = cfg
        self.ema: Optional[float] = None
        self.recoveries = 0

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("SAR adapts with gradients: call it outside torch.inference_mode()")
        cfg, opt = self.config, self.optimizer
        opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        e0 = entropy_threshold(logits.shape[1], cfg.entropy_margin)
        entropy = softmax_entropy(logits)
        reliable = entropy.detach() < e0
        loss = reliable_entropy(entropy, reliable)
        loss.backward()
        norm = opt.grad_norm()
        if not bool(torch.isfinite(loss.detach() + norm)):
            return self._skip(logits)
        opt.first_step(zero_grad=True, grad_norm=norm)  # w + e(w)
        entropy2 = softmax_entropy(self.model(x))
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
        self.steps_taken += 1
        if self.ema is not None and self.ema < cfg.reset_constant:
            self._recover()
        return logits.detach()

    def _skip(self, logits: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        return logits.detach()

    @torch.no_grad()
    def _recover(self) -> None:
        """Model recovery: trained parameters and optimizer to their start values; the EMA and counters stay."""
        for p, p0 in zip(self.params, self._start_params):
            p.copy_(p0)
        self.optimizer.load_state_dict(copy.deepcopy(self._start_optimizer))
        self.recoveries += 1

    def reset(self) -> None:
        """Trained parameters, optimizer, EMA and counters back to their start values."""
        super().reset()
        self.ema = None
        self.recoveries = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _settings(self) -> dict:
        return {**super()._settings(), "config": dataclasses.asdict(self.config)}

    def _adaptation_state(self) -> dict:
        """Tent's (settings with the config, counters, optimizer, start values) plus the EMA and recoveries."""
        return {**super()._adaptation_state(), "sar": {"ema": self.ema, "recoveries": self.recoveries}}

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            super()._check_adaptation_state(state)
        except AdapterStateError as err:
            raise AdapterStateError(f"SAR ({err})") from err
        own = state.get("sar")
        if not isinstance(own, dict) or not isinstance(own.get("recoveries"), int) \
                or not (own.get("ema") is None or isinstance(own.get("ema"), float)):
            raise AdapterStateError(f"SAR: malformed EMA/recoveries in the state: {own!r}")

    def _load_adaptation_state(self, state: dict) -> None:
        super()._load_adaptation_state(state)
        self.ema, self.recoveries = state["sar"]["ema"], state["sar"]["recoveries"]
