"""`IMSE`: test-time adaptation of the singular values of a spectralized ViT (docs/design.md §6).

Per batch, the tent way (`logits = adapter(x)` predicts and adapts):
  1. code bank: patch-embedding statistics → shift detection → on a new domain, retrieve a code;
  2. one SAM update of the `s` of the adapted blocks with
         L = mean_{H(x) < E0} H(x) − λ · L_div,   E0 = margin · ln C,
     forward → L → backward → ascend → forward (reliable set re-filtered) → L → backward →
     restore → Adam step. The predictions are the first forward's logits.
A step whose loss or gradient is not finite is skipped (counted in `skipped_steps`); `s` is left as it was.

`IMSE` is an `nn.Module` holding the model as `self.model`; `state_dict()` carries the whole adaptation
state (model with its codes, Adam state, code bank, counters; see `tta.adapter`), so a stream resumes
from a saved state with identical results.
"""
import copy
import dataclasses
import re
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..layers import FusedSpectralLinear, spectral_layers, spectralize
from ..losses import diversity_loss, entropy_threshold, reliable_entropy, reliable_mask, softmax_entropy
from ..optim import SAM
from .adapter import Adapter, AdapterStateError, check_optimizer_state, differences
from .code_bank import BankEvent, CodeBank, Retrieval
from .config import IMSEConfig
from .diversity_probe import DiversityProbe
from .domain_stats import DomainStats, patch_embedding_tokens

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _block_of(name: str) -> Optional[int]:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


class IMSE(Adapter):
    """IMSE(model, config=None): spectralizes `model` in place if needed and adapts it on every call.

    `adapter.train()` / `eval()` leave the model in train mode (see `tta.adapter`); adaptation goes on.
    """

    kind = "IMSE"

    def __init__(self, model: nn.Module, config: Optional[IMSEConfig] = None) -> None:
        super().__init__()
        cfg = IMSEConfig() if config is None else config
        if not isinstance(cfg, IMSEConfig):
            raise TypeError(f"IMSE: config must be an IMSEConfig, got {type(cfg).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"IMSE: model must be an nn.Module, got {type(model).__name__}")
        self.config = cfg
        self.model = model
        if not spectral_layers(model):
            spectralize(model)
        model.requires_grad_(False)
        self.layers: dict[str, FusedSpectralLinear] = spectral_layers(model)
        blocks = {n: _block_of(n) for n in self.layers}
        in_blocks = [b for b in blocks.values() if b is not None]
        if not in_blocks:
            raise ValueError("IMSE: no spectral layer lives in a `blocks.<i>` module; is this a timm ViT?")
        depth = max(in_blocks) + 1
        adapt = self._resolve_blocks(cfg.adapt_blocks, depth)
        if cfg.diversity_blocks > depth:
            raise ValueError(f"IMSE: diversity_blocks={cfg.diversity_blocks} but the model has {depth} blocks")
        div = set(range(depth - cfg.diversity_blocks, depth))

        self.adapted = {n: m for n, m in self.layers.items() if blocks[n] in adapt}
        if not self.adapted:
            raise ValueError(f"IMSE: no spectral layer in the adapted blocks {sorted(adapt)} (depth {depth})")
        for m in self.adapted.values():
            m.s.requires_grad_(True)
        probed = {n: m for n, m in self.layers.items() if blocks[n] in div}
        self.probe = DiversityProbe(probed) if cfg.diversity_weight > 0 else None
        self.optimizer = SAM([m.s for m in self.adapted.values()], torch.optim.Adam, rho=cfg.rho,
                             adaptive=False, lr=cfg.lr, betas=cfg.betas)
        self._start_codes = self._codes()
        self._start_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.bank = CodeBank(self._start_codes, cfg.retrieval, cfg.shift_threshold, cfg.stats_momentum,
                             cfg.stats_window, cfg.temperature, cfg.max_entries, cfg.bank_policy)
        self.skipped_steps = 0
        self.steps_taken = 0
        model.train()  # as the official code; timm ViTs have no batch statistics

    @staticmethod
    def _resolve_blocks(blocks: Optional[Iterable[int]], depth: int) -> set[int]:
        if blocks is None:
            return set(range(max(depth - 3, 0)))
        out = set()
        for b in blocks:
            if not -depth <= b < depth:
                raise ValueError(f"IMSE: adapt_blocks index {b} out of range for {depth} blocks")
            out.add(b % depth)
        return out

    # ------------------------------------------------------------------ public
    @property
    def events(self) -> list[BankEvent]:
        """The code bank's log: shifts, retrievals (with distances), drops and merges."""
        return self.bank.events

    def forward(self, x: Tensor) -> Tensor:
        """Predict `x` (the first forward's logits, detached) and adapt."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("IMSE adapts with gradients: call it outside torch.inference_mode()")
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise TypeError(f"IMSE: expected an image batch (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        if self.config.episodic:
            self._restore(self._start_codes, reset_optimizer=True)
        self._observe(x)
        logits = None
        for _ in range(self.config.steps):
            logits = self._step(x)
        return logits

    def reset(self) -> None:
        """Back to the start: pretrained `s`, fresh optimizer, bank with its source entry only, counters 0."""
        self._restore(self._start_codes, reset_optimizer=True)
        self.bank.reset()
        self.skipped_steps = self.steps_taken = 0

    @torch.no_grad()
    def source_statistics(self, batches: Iterable) -> DomainStats:
        """Record entry 0's descriptor from clean source images (a DataLoader or an iterable of
        tensors or (images, ...) tuples); EMA over windows as during the stream (the official code)."""
        tracker = self.bank.tracker
        tracker.reset()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise TypeError("source_statistics: expected image batches (B, C, H, W) or (images, labels) tuples")
            tracker.observe(patch_embedding_tokens(self.model, x), detect=False)
        stats = tracker.summary()
        if stats is None:
            raise ValueError("source_statistics: no images were given")
        self.bank.set_source_stats(stats)
        return stats

    def save_bank(self, path) -> None:
        """Write the code bank to a safetensors file, atomically (a failed save keeps the old file)."""
        self.bank.save(path)

    def load_bank(self, path) -> None:
        """Replace the code bank with a file's; it must come from this model (same layers, same source code).

        On any failure (`BankFileError`, `FileNotFoundError`, ...) the adapter is unchanged: bank, `s`,
        optimizer and counters are as they were."""
        self.bank.load(path, channels=getattr(self.model, "embed_dim", None))

    # ------------------------------------------------------------------ state (tta.adapter)
    def _adaptation_state(self) -> dict:
        """config (as a dict), layer names, counters, optimizer (Adam inside SAM) and code bank."""
        return {"config": dataclasses.asdict(self.config), "layers": list(self.layers), "adapted": list(self.adapted),
                "counters": {"steps_taken": self.steps_taken, "skipped_steps": self.skipped_steps},
                "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict()}

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            found, want = state["config"], dataclasses.asdict(self.config)
            if found != want:
                raise AdapterStateError(f"IMSE: the state was saved with another config: "
                                        f"{'; '.join(differences(found, want))}")
            for key, own in (("layers", list(self.layers)), ("adapted", list(self.adapted))):
                if list(state[key]) != own:
                    diff = sorted(set(state[key]) ^ set(own))[:6]
                    raise AdapterStateError(f"IMSE: the state's {key} spectral layers differ from this model's "
                                            f"({len(state[key])} vs {len(own)}; differences: {diff})")
            counters = state["counters"]
            if not all(isinstance(counters[k], int) for k in ("steps_taken", "skipped_steps")):
                raise AdapterStateError(f"IMSE: malformed counters in the state: {counters!r}")
            check_optimizer_state(state["optimizer"], self.optimizer, "IMSE")
        except KeyError as err:
            raise AdapterStateError(f"IMSE: the adapter state lacks {err}") from err

    def _load_adaptation_state(self, state: dict) -> None:
        try:
            self.bank.load_state_dict(state["bank"])  # checked and converted before it changes anything
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterStateError(f"IMSE: the code bank state does not fit: {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self._start_codes = {k: v.detach().clone() for k, v in self.bank._source_codes.items()}
        self.steps_taken = state["counters"]["steps_taken"]
        self.skipped_steps = state["counters"]["skipped_steps"]

    # ------------------------------------------------------------------ internals
    def _codes(self) -> dict[str, Tensor]:
        return {n: m.s.detach().clone() for n, m in self.layers.items()}

    def _snapshot(self):
        return self._codes(), copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def _restore(self, codes: dict[str, Tensor], reset_optimizer: bool, optimizer_state: Optional[dict] = None) -> None:
        for n, m in self.layers.items():
            m.s.copy_(codes[n])
        if optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        elif reset_optimizer:
            self.optimizer.load_state_dict(copy.deepcopy(self._start_optimizer))

    def _observe(self, x: Tensor) -> Optional[Retrieval]:
        found = self.bank.observe(patch_embedding_tokens(self.model, x), self._snapshot)
        if found is not None:
            load = self.config.optimizer_on_retrieval == "load" and found.optimizer_state is not None
            self._restore(found.codes, reset_optimizer=True, optimizer_state=found.optimizer_state if load else None)
        return found

    def _loss(self, entropy: Tensor, mask: Tensor) -> Tensor:
        loss = reliable_entropy(entropy, mask)
        if self.probe is not None:
            div = diversity_loss(self.probe.take(), self.config.diversity_ratio, self.config.diversity_blocks)
            loss = loss - self.config.diversity_weight * div
        return loss

    def _healthy(self, loss: Tensor) -> bool:
        """Loss and gradient norm finite (one device sync)."""
        return bool(torch.isfinite(loss.detach() + self.optimizer.grad_norm()))

    def _skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1

    @torch.enable_grad()
    def _forward(self, x: Tensor) -> Tensor:
        if self.probe is None:
            return self.model(x)
        with self.probe.capture():
            return self.model(x)

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        logits = self._forward(x)
        entropy = softmax_entropy(logits)
        e0 = entropy_threshold(logits.shape[1], self.config.entropy_margin)
        mask = reliable_mask(entropy.detach(), e0)
        loss = self._loss(entropy, mask)
        loss.backward()
        if not self._healthy(loss):
            self._skip()
            return logits.detach()
        opt.first_step(zero_grad=True)

        entropy2 = softmax_entropy(self._forward(x))[mask]  # the first pass's reliable set, filtered again
        loss2 = self._loss(entropy2, reliable_mask(entropy2.detach(), e0))
        loss2.backward()
        if not self._healthy(loss2):
            opt.unperturb()
            self._skip()
            return logits.detach()
        opt.second_step(zero_grad=True)
        self.steps_taken += 1
        return logits.detach()
