"""`EATA` (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022).

Entropy minimisation on reliable, non-redundant samples, re-weighted, with a Fisher regulariser, after the
official code (github.com/mr-eggplant/EATA at f739b36: eata.py) in its ViT form from the SAR repository
(github.com/mr-eggplant/SAR at 20f6e24: eata.py, main.py). The step, the Fisher and the deliberate differences:
docs/design.md, sections 11 and 12.
"""
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import entropy_threshold, softmax_entropy
from .adapter import AdapterStateError
from .method import Method, source_images
from .method_config import MethodConfig
from .parameters import configure_for_adaptation, norm_parameters


@dataclass
class EATAConfig(MethodConfig):
    """Official ViT-B/16 ImageNet-C settings, batch 64 (mr-eggplant/SAR @20f6e24, main.py).

    lr, momentum       SGD: lr at batch 64 (main.py lines 191–193: 0.001 / 64 · batch for vitbase_timm),
                       momentum 0.9 (line 273).
    lr_scaling, lr_batch1_factor, batch_size   the authors' batch scaling (`tta.lr_scaling`): "linear", not
                       doubled at batch 1; batch_size None: lr as given.
    entropy_margin     E0 = entropy_margin · ln C (main.py line 98: 0.4 · ln 1000).
    d_margin           cosine-similarity threshold of the redundancy filter (main.py line 99: 0.05).
    fisher_alpha       weight of the Fisher regulariser (main.py line 97: 2000).
    probs_momentum     p̄ ← m · p̄ + (1 − m) · mean softmax (eata.py `update_model_probs`: 0.9).
    steps, episodic    updates per batch; restore the start state before every batch.
    """

    lr: float = 1e-3
    lr_scaling: str = "linear"
    lr_batch1_factor: float = 1.0
    momentum: float = 0.9
    entropy_margin: float = 0.4
    d_margin: float = 0.05
    fisher_alpha: float = 2000.0
    probs_momentum: float = 0.9

    def check(self) -> None:
        self.need_fraction("momentum", "probs_momentum")
        self.need(self.entropy_margin > 0,
                  f"entropy_margin must be > 0 (a fraction of ln C), got {self.entropy_margin}")
        self.need(self.d_margin > 0, f"d_margin must be > 0 (a cosine similarity, at most 1 keeps all), "
                                     f"got {self.d_margin}")
        self.need_non_negative("fisher_alpha")


def _probs(logits: Tensor) -> Tensor:
    z = logits if logits.dtype == torch.float64 else logits.float()
    return z.softmax(1)


class EATA(Method):
    """EATA(model, config=None, *, compile=False, source=None, **fields): adapts `model` (in place, train mode)
    on every call; `compile=` compiles the model's forward.

    `source` (clean images: tensors or (images, labels) tuples) sets the Fisher regulariser (`prepare`).
    `probs` is the moving average p̄ (None before the first selected sample); `reliable_samples` and
    `selected_samples` count the samples that passed the entropy filter and both filters.
    """

    kind = "EATA"
    config_class = EATAConfig
    uses_source = True

    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        configure_for_adaptation(model)
        return norm_parameters(model, "EATA")

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.config.momentum)

    def _setup(self) -> None:
        self.probs: Optional[Tensor] = None
        self.reliable_samples = self.selected_samples = 0
        self.fisher: Optional[list[Tensor]] = None
        self.fisher_anchor: Optional[list[Tensor]] = None

    def fisher_from(self, batches: Iterable) -> int:
        """The same as `prepare(batches)`: the Fisher regulariser from clean source images."""
        return self.prepare(batches)

    @torch.enable_grad()
    def _prepare(self, batches: Iterable) -> int:
        """Set the Fisher regulariser from clean source images; θ0 = the trained parameters now. Returns the
        number of images used."""
        sums = [torch.zeros_like(p) for p in self.params]
        n_batches = n_images = 0
        for x in source_images(batches, "EATA.prepare"):
            logits = self.model(x)
            loss = F.cross_entropy(logits, logits.argmax(1))  # the model's own predictions as labels
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g.detach() ** 2)
            n_batches += 1
            n_images += x.shape[0]
        if n_batches == 0:
            raise ValueError("EATA.prepare: no images were given")
        self.fisher = [s / n_batches for s in sums]
        self.fisher_anchor = [p.detach().clone() for p in self.params]
        return n_images

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._call(x)
        e0 = entropy_threshold(logits.shape[1], cfg.entropy_margin)
        entropy = softmax_entropy(logits)
        reliable = entropy.detach() < e0
        probs = _probs(logits.detach())
        if self.probs is None:
            selected = reliable
        else:
            cos = F.cosine_similarity(self.probs.unsqueeze(0), probs, dim=1)
            selected = reliable & (cos.abs() < cfg.d_margin)
        n_reliable, n_selected = int(reliable.sum()), int(selected.sum())
        if n_selected:
            mean = probs[selected].mean(0)
            m = cfg.probs_momentum
            self.probs = mean if self.probs is None else m * self.probs + (1 - m) * mean
        self.reliable_samples += n_reliable
        self.selected_samples += n_selected
        if not n_selected:
            return logits.detach()
        h = entropy[selected]
        loss = (h * (1 / torch.exp(h.detach() - e0))).mean()
        if self.fisher is not None and cfg.fisher_alpha > 0:
            loss = loss + cfg.fisher_alpha * sum((f * (p - p0) ** 2).sum()
                                                 for f, p, p0 in zip(self.fisher, self.params, self.fisher_anchor))
        self._update(loss)
        return logits.detach()

    def _reset_state(self) -> None:
        """p̄ back to None; the Fisher (source information) stays."""
        self.probs = None

    def _reset_counters(self) -> None:
        self.reliable_samples = self.selected_samples = 0

    # ------------------------------------------------------------------ state (tta.adapter)
    def _method_state(self) -> dict:
        """p̄, the sample counts and the Fisher regulariser (F and θ0, or None)."""
        return {"probs": self.probs, "reliable_samples": self.reliable_samples,
                "selected_samples": self.selected_samples,
                "fisher": None if self.fisher is None else list(self.fisher),
                "fisher_anchor": None if self.fisher_anchor is None else list(self.fisher_anchor)}

    def _check_method_state(self, own) -> None:
        if not isinstance(own, dict) or not all(isinstance(own.get(k), int)
                                                for k in ("reliable_samples", "selected_samples")):
            raise AdapterStateError(f"EATA: malformed adapter state (p̄, counts, Fisher): {own!r}")
        probs = own.get("probs")
        if probs is not None and not (isinstance(probs, Tensor) and probs.dim() == 1):
            raise AdapterStateError("EATA: the state's moving-average probabilities are not a vector")
        shapes = [tuple(p.shape) for p in self.params]
        for key in ("fisher", "fisher_anchor"):
            ts = own.get(key)
            if ts is not None and (not isinstance(ts, (list, tuple)) or
                                   [tuple(t.shape) if isinstance(t, Tensor) else None for t in ts] != shapes):
                raise AdapterStateError(f"EATA: the state's {key} does not match the trained parameters' shapes")
        if (own.get("fisher") is None) != (own.get("fisher_anchor") is None):
            raise AdapterStateError("EATA: the state has a Fisher without its anchor θ0 (or the other way round)")

    def _load_method_state(self, own: dict) -> None:
        dev = self.params[0].device
        self.probs = None if own["probs"] is None else own["probs"].to(dev)
        self.reliable_samples, self.selected_samples = own["reliable_samples"], own["selected_samples"]
        if own["fisher"] is None:
            self.fisher = self.fisher_anchor = None
        else:
            def like(ts):
                return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(ts, self.params)]

            self.fisher, self.fisher_anchor = like(own["fisher"]), like(own["fisher_anchor"])
