"""`DeYO` (Lee et al., "Entropy is not Enough for Test-Time Adaptation", ICLR 2024).

Entropy minimisation on samples that are confident and shape-based (PLPD), after the official code
(github.com/Jhyun17/DeYO at 3d7d289: methods/deyo.py `forward_and_adapt_deyo`, `collect_params`; config.py and
exp_deyo.sh for the ViT-B/16 settings). The step and the deliberate differences: docs/design.md, sections 11, 12.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import entropy_threshold, softmax_entropy
from .adapter import AdapterStateError
from .method import Method
from .method_config import MethodConfig
from .parameters import block_norm_parameters, configure_for_adaptation


@dataclass
class DeYOConfig(MethodConfig):
    """Official ViT-B/16 ImageNet-C settings, batch 64 (Jhyun17/DeYO @3d7d289).

    lr, momentum       SGD: lr at batch 64 (main.py lines 350–352: 0.001 / 64 · batch for vitbase_timm),
                       momentum 0.9 (line 588).
    lr_scaling, lr_batch1_factor, batch_size   the authors' batch scaling (`tta.lr_scaling`): "linear",
                       doubled at batch 1 (main.py lines 377–379); batch_size None: lr as given.
    deyo_margin        entropy filter at deyo_margin · ln C (config.py line 52, exp_deyo.sh ETHR: 0.5).
    margin_e0          entropy re-weighting margin, · ln C (config.py line 54, exp_deyo.sh EMAR: 0.4).
    plpd_threshold     PLPD filter (config.py line 55 and exp_deyo.sh DTHR for vitbase_timm: 0.2).
    patch_len          patches per row/column of the shuffle (config.py line 39: 4; aug_type 'patch', line 47).
    reweight_ent, reweight_plpd   weights of the two re-weighting terms (config.py lines 61–62: 1 and 1).
    frozen_blocks      the last blocks not adapted (deyo.py lines 198–207: blocks 9–11 of 12, and `norm`).
    seed               the patch permutations' generator; None (the default) is 0, or the run's seed under
                       imse-eval (`tta.build(..., seed=)`).
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    lr: float = 1e-3
    lr_scaling: str = "linear"
    lr_batch1_factor: float = 2.0
    momentum: float = 0.9
    deyo_margin: float = 0.5
    margin_e0: float = 0.4
    plpd_threshold: float = 0.2
    patch_len: int = 4
    reweight_ent: float = 1.0
    reweight_plpd: float = 1.0
    frozen_blocks: int = 3
    seed: Optional[int] = None

    def check(self) -> None:
        self.need_fraction("momentum")
        self.need(self.deyo_margin > 0, f"deyo_margin must be > 0 (a fraction of ln C), got {self.deyo_margin}")
        self.need(self.margin_e0 > 0, f"margin_e0 must be > 0 (a fraction of ln C), got {self.margin_e0}")
        self.need(-1 <= self.plpd_threshold < 1, f"plpd_threshold must be in [-1, 1) (a difference of probabilities), "
                  f"got {self.plpd_threshold}")
        self.need_at_least("patch_len", 2)
        self.need_non_negative("reweight_ent", "reweight_plpd")
        self.need_at_least("frozen_blocks", 0)


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


class DeYO(Method):
    """DeYO(model, config=None, *, compile=False, **fields): adapts `model` (in place, train mode) on every call;
    see the module doc. `compile=` compiles the model's forward (the adapting pass).

    `reliable_samples` and `selected_samples` count the samples that passed the entropy filter and both filters.
    """

    kind = "DeYO"
    config_class = DeYOConfig

    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        configure_for_adaptation(model)
        return block_norm_parameters(model, self.config.frozen_blocks, "DeYO")

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.config.momentum)

    def _setup(self) -> None:
        self.generator = torch.Generator()
        self._seed()
        self.reliable_samples = self.selected_samples = 0

    def _seed(self) -> None:
        self.generator.manual_seed(0 if self.config.seed is None else self.config.seed)

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._call(x)
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

    def _reset_state(self) -> None:
        """The permutation generator back to its seed."""
        self._seed()

    def _reset_counters(self) -> None:
        self.reliable_samples = self.selected_samples = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _method_state(self) -> dict:
        """The sample counts and the permutation generator's state."""
        return {"reliable_samples": self.reliable_samples, "selected_samples": self.selected_samples,
                "generator": self.generator.get_state()}

    def _check_method_state(self, own) -> None:
        if not isinstance(own, dict) or not all(isinstance(own.get(k), int)
                                                for k in ("reliable_samples", "selected_samples")) \
                or not (isinstance(own.get("generator"), Tensor) and own["generator"].dtype == torch.uint8):
            raise AdapterStateError("DeYO: malformed adapter state (sample counts, generator state)")

    def _load_method_state(self, own: dict) -> None:
        self.reliable_samples, self.selected_samples = own["reliable_samples"], own["selected_samples"]
        self.generator.set_state(own["generator"].cpu())
