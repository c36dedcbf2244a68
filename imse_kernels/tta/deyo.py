"""`DeYO` (Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled
Factors", ICLR 2024).

Entropy minimisation on samples whose prediction is both confident and shape-based, after the official code
(github.com/Jhyun17/DeYO at 3d7d289: methods/deyo.py `forward_and_adapt_deyo`, `collect_params`; config.py
and exp_deyo.sh for the ViT-B/16 settings). Per batch (`logits = adapter(x)`, the forward's logits):
  1. H = softmax entropy; S1 = {H < deyo_margin · ln C} (C = the logits' classes); none: no update;
  2. x' = the S1 images with their patches shuffled (a patch_len × patch_len grid, one random permutation per
     image); PLPD = p(ŷ | x) − p(ŷ | x'), ŷ = argmax p(· | x), x' forwarded without gradient;
     S2 = S1 ∩ {PLPD > plpd_threshold}; none: no update;
  3. L = mean_{S2} H · (1/exp(H − margin_e0 · ln C) + 1/exp(−PLPD)) (weights detached); one SGD step.
The permutations come from a CPU `torch.Generator` seeded with `seed` (re-seeded by `reset()`). Images whose
sides are not multiples of patch_len are resized (bilinear) to the nearest smaller multiples for the shuffle
and back, as the official torchvision Resize. A loss or gradient that is not finite skips the update
(`skipped_steps`).

Trained parameters (official `collect_params`, the same as SAR's): the normalisation affine parameters of
every transformer block but the last `frozen_blocks` (blocks 9–11 of ViT-B's 12), not the final `norm`.
DeYO is built on `Tent` (as the official code is on Tent's): its optimizer, start values, `reset()` and
state handling, with the step replaced.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import entropy_threshold, softmax_entropy
from .adapter import AdapterStateError
from .sar import sar_parameters
from .tent import Tent


@dataclass
class DeYOConfig:
    """Official ViT-B/16 ImageNet-C settings, batch 64 (Jhyun17/DeYO @3d7d289).

    lr, momentum       SGD; official lr = 0.001 · batch / 64 (main.py lines 350–352), momentum 0.9 (line 588).
    deyo_margin        entropy filter at deyo_margin · ln C (config.py line 52, exp_deyo.sh ETHR: 0.5).
    margin_e0          entropy re-weighting margin, · ln C (config.py line 54, exp_deyo.sh EMAR: 0.4).
    plpd_threshold     PLPD filter (config.py line 55 and exp_deyo.sh DTHR for vitbase_timm: 0.2).
    patch_len          patches per row/column of the shuffle (config.py line 39: 4; aug_type 'patch', line 47).
    reweight_ent, reweight_plpd   weights of the two re-weighting terms (config.py lines 61–62: 1 and 1).
    frozen_blocks      the last blocks not adapted (deyo.py lines 198–207: blocks 9–11 of 12, and `norm`).
    seed               the patch permutations' generator.
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    lr: float = 1e-3
    momentum: float = 0.9
    deyo_margin: float = 0.5
    margin_e0: float = 0.4
    plpd_threshold: float = 0.2
    patch_len: int = 4
    reweight_ent: float = 1.0
    reweight_plpd: float = 1.0
    frozen_blocks: int = 3
    seed: int = 0
    steps: int = 1
    episodic: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"DeYOConfig: {msg}")

        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.deyo_margin > 0, f"deyo_margin must be > 0 (a fraction of ln C), got {self.deyo_margin}")
        need(self.margin_e0 > 0, f"margin_e0 must be > 0 (a fraction of ln C), got {self.margin_e0}")
        need(-1 <= self.plpd_threshold < 1, f"plpd_threshold must be in [-1, 1) (a difference of probabilities), "
             f"got {self.plpd_threshold}")
        need(isinstance(self.patch_len, int) and self.patch_len >= 2,
             f"patch_len must be an int >= 2 (patches per side), got {self.patch_len}")
        need(self.reweight_ent >= 0, f"reweight_ent must be >= 0, got {self.reweight_ent}")
        need(self.reweight_plpd >= 0, f"reweight_plpd must be >= 0, got {self.reweight_plpd}")
        need(isinstance(self.frozen_blocks, int) and self.frozen_blocks >= 0,
             f"frozen_blocks must be an int >= 0, got {self.frozen_blocks}")
        need(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps}")
        need(isinstance(self.episodic, bool), f"episodic must be a bool, got {self.episodic!r}")


def patch_shuffle(x: Tensor, patch_len: int, generator: torch.Generator) -> Tensor:
    """`x` (B, C, H, W) with its patch_len × patch_len grid of patches permuted, one permutation per image
    (drawn on the CPU from `generator`)."""
    b, c, h, w = x.shape
    hh, ww = (h // patch_len) * patch_len, (w // patch_len) * patch_len
    if hh == 0 or ww == 0:
        raise ValueError(f"DeYO: images of {h}×{w} are smaller than the {patch_len}×{patch_len} patch grid")
    y = x if (hh, ww) == (h, w) else F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
    ph, pw, n = hh // patch_len, ww // patch_len, patch_len * patch_len
    patches = y.reshape(b, c, patch_len, ph, patch_len, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, ph, pw)
    perm = torch.argsort(torch.rand(b, n, generator=generator), dim=-1).to(x.device)
    patches = patches[torch.arange(b, device=x.device).unsqueeze(-1), perm]
    y = patches.reshape(b, patch_len, patch_len, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
    return y if (hh, ww) == (h, w) else F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


class DeYO(Tent):
    """DeYO(model, config=None): adapts `model` (in place, train mode) on every call; see the module doc.

    `reliable_samples` and `selected_samples` count the samples that passed the entropy filter and both filters.
    """

    kind = "DeYO"

    def __init__(self, model: nn.Module, config: Optional[DeYOConfig] = None) -> None:
        cfg = DeYOConfig() if config is None else config
        if not isinstance(cfg, DeYOConfig):
            raise TypeError(f"DeYO: config must be a DeYOConfig, got {type(cfg).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"DeYO: model must be an nn.Module, got {type(model).__name__}")
        params = [p for _, p in sar_parameters(model, cfg.frozen_blocks, "DeYO")]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        super().__init__(model, optimizer, steps=cfg.steps, episodic=cfg.episodic)
        self.config = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.reliable_samples = self.selected_samples = 0

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("DeYO adapts with gradients: call it outside torch.inference_mode()")
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        c = logits.shape[1]
        entropy = softmax_entropy(logits)
        reliable = entropy.detach() < entropy_threshold(c, cfg.deyo_margin)
        n_reliable = int(reliable.sum())
        self.reliable_samples += n_reliable
        if not n_reliable:
            return logits.detach()
        with torch.no_grad():
            shuffled = self.model(patch_shuffle(x[reliable].detach(), cfg.patch_len, self.generator))
            z = logits.detach()[reliable]
            p = (z if z.dtype == torch.float64 else z.float()).softmax(1)
            zs = shuffled if shuffled.dtype == torch.float64 else shuffled.float()
            cls = p.argmax(1, keepdim=True)
            plpd = (p.gather(1, cls) - zs.softmax(1).to(p.dtype).gather(1, cls)).squeeze(1)
        keep = plpd > cfg.plpd_threshold
        n_selected = int(keep.sum())
        self.selected_samples += n_selected
        if not n_selected:
            return logits.detach()
        h, d = entropy[reliable][keep], plpd[keep]
        weight = cfg.reweight_ent / torch.exp(h.detach() - entropy_threshold(c, cfg.margin_e0)) \
            + cfg.reweight_plpd / torch.exp(-d)
        loss = (h * weight).mean()
        self._update(loss)
        return logits.detach()

    def reset(self) -> None:
        """Trained parameters, optimizer, counters and the permutation generator back to their start values."""
        super().reset()
        self.generator.manual_seed(self.config.seed)
        self.reliable_samples = self.selected_samples = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _settings(self) -> dict:
        return {**super()._settings(), "config": dataclasses.asdict(self.config)}

    def _adaptation_state(self) -> dict:
        """Tent's (settings with the config, counters, optimizer, start values) plus the sample counts and the
        permutation generator's state."""
        return {**super()._adaptation_state(),
                "deyo": {"reliable_samples": self.reliable_samples, "selected_samples": self.selected_samples,
                         "generator": self.generator.get_state()}}

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            super()._check_adaptation_state(state)
        except AdapterStateError as err:
            raise AdapterStateError(f"DeYO ({err})") from err
        own = state.get("deyo")
        if not isinstance(own, dict) or not all(isinstance(own.get(k), int)
                                                for k in ("reliable_samples", "selected_samples")) \
                or not (isinstance(own.get("generator"), Tensor) and own["generator"].dtype == torch.uint8):
            raise AdapterStateError("DeYO: malformed adapter state (sample counts, generator state)")

    def _load_adaptation_state(self, state: dict) -> None:
        super()._load_adaptation_state(state)
        own = state["deyo"]
        self.reliable_samples, self.selected_samples = own["reliable_samples"], own["selected_samples"]
        self.generator.set_state(own["generator"].cpu())
