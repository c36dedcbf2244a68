"""`CoTTA` (Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022).

A mean teacher with augmentation-averaged pseudo-labels and stochastic restore, after the official ImageNet
code (github.com/qinenergy/cotta at c212a20: imagenet/cotta.py `CoTTA.forward_and_adapt`, imagenet/conf.py,
imagenet/imagenetc.py `setup_optimizer`, imagenet/cfgs/10orders/cotta/cotta*.yaml). Per batch
(`logits = adapter(x)` returns the teacher's prediction, as the official code):
  1. the source model ("anchor") gives its mean top-1 confidence on x; below `confidence_threshold` the
     teacher's logits are averaged over `augmentations` random augmentations of x (`tta.augment`), else
     the teacher's logits on x are used;
  2. the student takes one SGD step (momentum, Nesterov) on the symmetric cross entropy between its logits
     and the teacher's: −½ Σ p_t log p_s − ½ Σ p_s log p_t, averaged over the batch;
  3. teacher ← α · teacher + (1 − α) · student (trained parameters; the others are shared and never change);
  4. stochastic restore: each element of every trained parameter goes back to its source value with
     probability `restore_prob`.
The official ImageNet code updates *all* `weight` and `bias` parameters of the model (cotta.py
`configure_model`, `collect_params`: every module's, not only the normalisation layers), so this does too;
parameters with other names (a ViT's `cls_token`, `pos_embed`) stay frozen, as there. The official repo
has no ViT configuration; its ImageNet-C one (ResNet-50, batch 64) is used.
Random numbers: augmentation parameters from a CPU `torch.Generator` seeded with `seed`, per-element draws
(augmentation noise, restore masks) from a generator on the model's device seeded with seed + 1; `reset()`
re-seeds both. A loss or gradient that is not finite skips the update (step, teacher update and restore:
`skipped_steps`). The teacher and the anchor are copies of the model held outside the module tree (their
state is in `_extra_state`); move the model before wrapping it.

CoTTA is built on `Tent` (as the official code is on Tent's): its optimizer, start values, `reset()` and
state handling, with the step replaced.
"""
import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .adapter import AdapterStateError
from .augment import CoTTAAugment
from .tent import Tent


@dataclass
class CoTTAConfig:
    """Official ImageNet-C settings (qinenergy/cotta @c212a20; no ViT configuration exists there).

    lr, momentum, nesterov, weight_decay   SGD (cfgs/10orders/cotta/cotta0.yaml: LR 0.01, SGD, WD 0;
                       imagenetc.py lines 117–123: momentum 0.9, dampening 0, nesterov True); batch 64.
    ema_alpha          teacher ← α · teacher + (1 − α) · student (cotta.py line 119: 0.999).
    confidence_threshold   augment when the anchor's mean top-1 probability is below it (cotta.py line 102: 0.1,
                       for 1000 classes; that mean is at least 1/C, so with C <= 10 classes 0.1 never augments:
                       the official CIFAR-10 / CIFAR-100 configs use 0.92 / 0.72).
    augmentations      augmented teacher passes averaged (cotta.py line 100: 32).
    restore_prob       stochastic restore probability per element (cotta.py line 125: 0.001; the CIFAR
                       configs use 0.01).
    noise_std, soft_augment   the augmentations' gaussian noise and range set (cotta.py line 14: 0.005, False).
    seed               the generators of the augmentations and restore masks.
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
    seed: int = 0
    steps: int = 1
    episodic: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"CoTTAConfig: {msg}")

        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(isinstance(self.nesterov, bool), f"nesterov must be a bool, got {self.nesterov!r}")
        need(not self.nesterov or self.momentum > 0, "nesterov=True needs momentum > 0 (or set nesterov=False)")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.ema_alpha <= 1, f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        need(0 <= self.confidence_threshold <= 1,
             f"confidence_threshold must be in [0, 1] (a probability; 0 never augments), "
             f"got {self.confidence_threshold}")
        need(isinstance(self.augmentations, int) and self.augmentations >= 1,
             f"augmentations must be an int >= 1, got {self.augmentations}")
        need(0 <= self.restore_prob <= 1, f"restore_prob must be in [0, 1], got {self.restore_prob}")
        need(self.noise_std >= 0, f"noise_std must be >= 0, got {self.noise_std}")
        need(isinstance(self.soft_augment, bool), f"soft_augment must be a bool, got {self.soft_augment!r}")
        need(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps}")
        need(isinstance(self.episodic, bool), f"episodic must be a bool, got {self.episodic!r}")


def cotta_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter named `weight` or `bias` in `model` (official cotta.py
    `collect_params`, lines 136–153)."""
    return [(n, p) for n, p in model.named_parameters() if n.split(".")[-1] in ("weight", "bias")]


def symmetric_cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """−½ Σ p_t log p_s − ½ Σ p_s log p_t per row (official cotta.py `softmax_entropy`, line 134), in at
    least float32; `teacher` is detached."""
    s = student if student.dtype == torch.float64 else student.float()
    t = teacher.detach().to(s.dtype)
    return -0.5 * (t.softmax(1) * s.log_softmax(1)).sum(1) - 0.5 * (s.softmax(1) * t.log_softmax(1)).sum(1)


class CoTTA(Tent):
    """CoTTA(model, config=None): adapts `model` (the student, in place, train mode) on every call and
    returns the teacher's logits; see the module doc.

    `teacher` and `anchor` are deep copies of the model made at construction (the anchor stays the source
    model); `augmented_batches` counts the batches whose pseudo-labels were augmentation-averaged.
    """

    kind = "CoTTA"

    def __init__(self, model: nn.Module, config: Optional[CoTTAConfig] = None) -> None:
        cfg = CoTTAConfig() if config is None else config
        if not isinstance(cfg, CoTTAConfig):
            raise TypeError(f"CoTTA: config must be a CoTTAConfig, got {type(cfg).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"CoTTA: model must be an nn.Module, got {type(model).__name__}")
        params = [p for _, p in cotta_parameters(model)]
        if not params:
            raise ValueError("CoTTA: the model has no parameter named `weight` or `bias` to adapt")
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        super().__init__(model, optimizer, steps=cfg.steps, episodic=cfg.episodic)
        self.config = cfg
        # held outside the module tree: `model.*` stays the student's state (tta.adapter)
        object.__setattr__(self, "teacher", self._frozen_copy(model))
        object.__setattr__(self, "anchor", self._frozen_copy(model))
        self._teacher_params = [dict(self.teacher.named_parameters())[n] for n in self.param_names]
        self._anchor_params = [dict(self.anchor.named_parameters())[n] for n in self.param_names]
        self.augment = CoTTAAugment(soft=cfg.soft_augment, noise_std=cfg.noise_std)
        device = params[0].device
        self.generator = torch.Generator()
        self.device_generator = torch.Generator(device=device)
        self._seed()
        self.augmented_batches = 0

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        m = copy.deepcopy(model)
        m.requires_grad_(False)
        return m.train()  # as the official teacher (`self.model_ema.train()`)

    def _seed(self) -> None:
        self.generator.manual_seed(self.config.seed)
        self.device_generator.manual_seed(self.config.seed + 1)

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
        if torch.is_inference_mode_enabled():
            raise RuntimeError("CoTTA adapts with gradients: call it outside torch.inference_mode()")
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        target, augmented = self.pseudo_labels(x)
        self.augmented_batches += int(augmented)
        loss = symmetric_cross_entropy(logits, target).mean()
        loss.backward()
        norms = [p.grad.norm() for p in self.params if p.grad is not None]
        if not bool(torch.isfinite(loss.detach() + (torch.stack(norms).sum() if norms else 0.0))):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return target.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        with torch.no_grad():
            torch._foreach_mul_(self._teacher_params, cfg.ema_alpha)
            torch._foreach_add_(self._teacher_params, self.params, alpha=1 - cfg.ema_alpha)
            if cfg.restore_prob > 0:
                for p, p0 in zip(self.params, self._anchor_params):
                    mask = torch.rand(p.shape, generator=self.device_generator, device=p.device) < cfg.restore_prob
                    p.copy_(torch.where(mask, p0, p))
        return target.detach()

    @torch.no_grad()
    def reset(self) -> None:
        """Student, optimizer, teacher, generators and counters back to their start values."""
        super().reset()
        torch._foreach_copy_(self._teacher_params, self._start_params)
        self._seed()
        self.augmented_batches = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _settings(self) -> dict:
        return {**super()._settings(), "config": dataclasses.asdict(self.config)}

    def _adaptation_state(self) -> dict:
        """Tent's (settings with the config, counters, optimizer, start values = the anchor's) plus the teacher's
        trained parameters, the generators' states and the augmented-batch count."""
        return {**super()._adaptation_state(),
                "cotta": {"teacher": list(self._teacher_params), "generator": self.generator.get_state(),
                          "device_generator": self.device_generator.get_state(),
                          "augmented_batches": self.augmented_batches}}

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            super()._check_adaptation_state(state)
        except AdapterStateError as err:
            raise AdapterStateError(f"CoTTA ({err})") from err
        own = state.get("cotta")
        gens = ("generator", "device_generator")
        if not isinstance(own, dict) or not isinstance(own.get("augmented_batches"), int) or not all(
                isinstance(own.get(k), Tensor) and own[k].dtype == torch.uint8 for k in gens):
            raise AdapterStateError("CoTTA: malformed adapter state (teacher, generator states, counters)")
        teacher = own.get("teacher")
        if not isinstance(teacher, (list, tuple)) or [tuple(t.shape) if isinstance(t, Tensor) else None
                                                      for t in teacher] != [tuple(p.shape) for p in self.params]:
            raise AdapterStateError("CoTTA: the state's teacher does not match the trained parameters' shapes")

    @torch.no_grad()
    def _load_adaptation_state(self, state: dict) -> None:
        super()._load_adaptation_state(state)
        own = state["cotta"]
        for p, t in zip(self._teacher_params, own["teacher"]):
            p.copy_(t)
        for p, t in zip(self._anchor_params, self._start_params):
            p.copy_(t)  # the anchor is the source model: the start values
        self.generator.set_state(own["generator"].cpu())
        self.device_generator.set_state(own["device_generator"].cpu())
        self.augmented_batches = own["augmented_batches"]
