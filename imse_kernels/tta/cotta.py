"""`CoTTA` (Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022).

A mean teacher with augmentation-averaged pseudo-labels and stochastic restore, after the official ImageNet code
(github.com/qinenergy/cotta at c212a20: imagenet/cotta.py `CoTTA.forward_and_adapt`, imagenet/conf.py,
imagenet/imagenetc.py `setup_optimizer`, imagenet/cfgs/10orders/cotta/cotta*.yaml). The step, the trained
parameters and the deliberate differences: docs/design.md, sections 11 and 12.
"""
import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .adapter import AdapterStateError
from .augment import CoTTAAugment
from .method import Method
from .method_config import MethodConfig
from .parameters import configure_for_adaptation, weight_and_bias_parameters


@dataclass
class CoTTAConfig(MethodConfig):
    """Official ImageNet-C settings (qinenergy/cotta @c212a20; no ViT configuration exists there).

    lr, momentum, nesterov, weight_decay   SGD (cfgs/10orders/cotta/cotta0.yaml: LR 0.01, SGD, WD 0;
                       imagenetc.py lines 117–123: momentum 0.9, dampening 0, nesterov True); batch 64.
    lr_scaling, lr_batch1_factor, batch_size   batch scaling (`tta.lr_scaling`): the authors scale nothing
                       ("none": cfg.OPTIM.LR at any batch).
    ema_alpha          teacher ← α · teacher + (1 − α) · student (cotta.py line 119: 0.999).
    confidence_threshold   augment when the anchor's mean top-1 probability is below it (cotta.py line 102: 0.1,
                       for 1000 classes; that mean is at least 1/C, so with C <= 10 classes 0.1 never augments:
                       the official CIFAR-10 / CIFAR-100 configs use 0.92 / 0.72).
    augmentations      augmented teacher passes averaged (cotta.py line 100: 32).
    restore_prob       stochastic restore probability per element (cotta.py line 125: 0.001; the CIFAR
                       configs use 0.01).
    noise_std, soft_augment   the augmentations' gaussian noise and range set (cotta.py line 14: 0.005, False).
    seed               the generators of the augmentations and restore masks; None (the default) is 0, or the
                       run's seed under imse-eval (`tta.build(..., seed=)`).
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    ema_alpha: float = 0.999
    confidence_threshold: float = 0.1
    augmentations: int = 32
    restore_prob: float = 0.001
    noise_std: float = 0.005
    soft_augment: bool = False
    seed: Optional[int] = None

    def check(self) -> None:
        self.need_fraction("momentum")
        self.need(not self.nesterov or self.momentum > 0, "nesterov=True needs momentum > 0 (or set nesterov=False)")
        self.need_non_negative("weight_decay", "noise_std")
        self.need(0 <= self.ema_alpha <= 1, f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        self.need(0 <= self.confidence_threshold <= 1,
                  f"confidence_threshold must be in [0, 1] (a probability; 0 never augments), "
                  f"got {self.confidence_threshold}")
        self.need_at_least("augmentations", 1)
        self.need(0 <= self.restore_prob <= 1, f"restore_prob must be in [0, 1], got {self.restore_prob}")


def symmetric_cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """−½ Σ p_t log p_s − ½ Σ p_s log p_t per row (official cotta.py `softmax_entropy`, line 134), in at
    least float32; `teacher` is detached."""
    s = student if student.dtype == torch.float64 else student.float()
    t = teacher.detach().to(s.dtype)
    return -0.5 * (t.softmax(1) * s.log_softmax(1)).sum(1) - 0.5 * (s.softmax(1) * t.log_softmax(1)).sum(1)


class CoTTA(Method):
    """CoTTA(model, config=None, *, compile=False, **fields): adapts `model` (the student, in place, train
    mode) on every call and returns the teacher's logits; see the module doc. `compile=` compiles the
    student's forward.

    `teacher` and `anchor` are deep copies of the model made at construction (the anchor stays the source
    model); `augmented_batches` counts the batches whose pseudo-labels were augmentation-averaged.
    """

    kind = "CoTTA"
    config_class = CoTTAConfig

    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        configure_for_adaptation(model)
        return weight_and_bias_parameters(model, "CoTTA")

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.SGD(params, lr=self.lr, momentum=cfg.momentum, dampening=0.0,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)

    def _setup(self) -> None:
        cfg = self.config
        # held outside the module tree: `model.*` stays the student's state (tta.adapter)
        object.__setattr__(self, "teacher", self._frozen_copy(self.model))
        object.__setattr__(self, "anchor", self._frozen_copy(self.model))
        self._teacher_params = [dict(self.teacher.named_parameters())[n] for n in self.param_names]
        self._anchor_params = [dict(self.anchor.named_parameters())[n] for n in self.param_names]
        self.augment = CoTTAAugment(soft=cfg.soft_augment, noise_std=cfg.noise_std)
        self.generator = torch.Generator()
        self.device_generator = torch.Generator(device=self.params[0].device)
        self._seed()
        self.augmented_batches = 0

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        m = copy.deepcopy(model)
        m.requires_grad_(False)
        return m.train()  # as the official teacher (`self.model_ema.train()`)

    def _seed(self) -> None:
        seed = 0 if self.config.seed is None else self.config.seed
        self.generator.manual_seed(seed)
        self.device_generator.manual_seed(seed + 1)

    @torch.no_grad()
    def pseudo_labels(self, x: Tensor) -> tuple[Tensor, bool]:
        """(teacher logits for x, whether they were augmentation-averaged)."""
        cfg = self.config
        confidence = self.anchor(x).float().softmax(1).max(1).values.mean()
        teacher = self.teacher(x)
        if not bool(confidence < cfg.confidence_threshold):
            return teacher, False
        total = None
        for _ in range(cfg.augmentations):
            out = self.teacher(self.augment(x, self.generator, self.device_generator))
            total = out if total is None else total + out
        return total / cfg.augmentations, True

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._call(x)
        target, augmented = self.pseudo_labels(x)
        self.augmented_batches += int(augmented)
        if not self._update(symmetric_cross_entropy(logits, target).mean()):
            return target.detach()
        with torch.no_grad():
            torch._foreach_mul_(self._teacher_params, cfg.ema_alpha)
            torch._foreach_add_(self._teacher_params, self.params, alpha=1 - cfg.ema_alpha)
            if cfg.restore_prob > 0:
                for p, p0 in zip(self.params, self._anchor_params):
                    mask = torch.rand(p.shape, generator=self.device_generator, device=p.device) < cfg.restore_prob
                    p.copy_(torch.where(mask, p0, p))
        return target.detach()

    @torch.no_grad()
    def _reset_state(self) -> None:
        """Teacher and generators back to their start values."""
        torch._foreach_copy_(self._teacher_params, self._start_params)
        self._seed()

    def _reset_counters(self) -> None:
        self.augmented_batches = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _method_state(self) -> dict:
        """The teacher's trained parameters, the generators' states and the augmented-batch count."""
        return {"teacher": list(self._teacher_params), "generator": self.generator.get_state(),
                "device_generator": self.device_generator.get_state(), "augmented_batches": self.augmented_batches}

    def _check_method_state(self, own) -> None:
        gens = ("generator", "device_generator")
        if not isinstance(own, dict) or not isinstance(own.get("augmented_batches"), int) or not all(
                isinstance(own.get(k), Tensor) and own[k].dtype == torch.uint8 for k in gens):
            raise AdapterStateError("CoTTA: malformed adapter state (teacher, generator states, counters)")
        teacher = own.get("teacher")
        if not isinstance(teacher, (list, tuple)) or [tuple(t.shape) if isinstance(t, Tensor) else None
                                                      for t in teacher] != [tuple(p.shape) for p in self.params]:
            raise AdapterStateError("CoTTA: the state's teacher does not match the trained parameters' shapes")

    @torch.no_grad()
    def _load_method_state(self, own: dict) -> None:
        for p, t in zip(self._teacher_params, own["teacher"]):
            p.copy_(t)
        for p, t in zip(self._anchor_params, self._start_params):
            p.copy_(t)  # the anchor is the source model: the start values
        self.generator.set_state(own["generator"].cpu())
        self.device_generator.set_state(own["device_generator"].cpu())
        self.augmented_batches = own["augmented_batches"]
