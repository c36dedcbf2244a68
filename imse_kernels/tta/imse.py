"""`IMSE`: test-time adaptation of the singular values of a spectralized ViT (docs/design.md §6).

Per batch, the tent way (`logits = adapter(x)` predicts and adapts):
  1. code bank: patch-embedding statistics → shift detection → on a new domain, retrieve a code;
  2. one SAM update of the `s` of the adapted blocks with
         L = mean_{H(x) < E0} H(x) − λ · L_div,   E0 = margin · ln C,
     forward → L → backward → ascend → forward (reliable set re-filtered) → L → backward →
     restore → Adam step. The predictions are the first forward's logits.
A step whose loss or gradient is not finite is skipped (counted in `skipped_steps`); `s` is left as it was.

Host syncs (docs/design.md §6). The SAM update itself reads nothing back from the device: the
finiteness of L and ‖g‖ is a 0-dim bool tensor, the ascent, the restore and the Adam step
(`SAM.first_step/second_step(ok=...)`, foreach ops) are applied through it, so a skipped step leaves
`s`, Adam's moments and its step count bitwise unchanged; the reliable-sample filter is a mask (no
boolean indexing). Both passes always run (a skipped batch costs its second pass too). `skipped_steps`
and `steps_taken` are device counters, synced only when read. What remains per batch is the code
bank's decision in step 1 (`tta.domain_stats`, `tta.code_bank`): the finiteness check of the batch's
token moments (two reads), and, once the window has a descriptor, its token count and the SKL distance
that decides shift and retrieval (one read each): at most four small reads, all before the update.

`compile=True` (or a backend name such as "aot_eager", or a dict of `torch.compile` keywords) runs
forward + loss (the model, the diversity probe, both losses) through `torch.compile`; both SAM passes
call the same compiled function (the first with an all-true keep mask), and the batch dimension is
marked dynamic (`torch._dynamo.maybe_mark_dynamic`), so a partial last batch reuses the graph. It
recompiles only where N = batch × tokens crosses a route threshold of the planner (docs/design.md §2;
one graph per route pattern, a few at small batches, none above them) and once for a batch of 1
(dynamo specialises sizes 0 and 1); dynamo's recompile limit bounds it in any case. The update stays
eager. A skipped first step leaves Adam's state created at step 0 (zero moments) rather than absent;
the next step is the same either way.

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
from ..losses import diversity_loss, entropy_threshold, reliable_mask, softmax_entropy
from ..optim import SAM
from .adapter import Adapter, AdapterStateError, check_optimizer_state, differences
from .code_bank import BankEvent, CodeBank, Retrieval
from .config import IMSEConfig
from .diversity_probe import DiversityProbe
from .domain_stats import DomainStats, patch_embedding_tokens
from .tent import compile_fn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _block_of(name: str) -> Optional[int]:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def select_layers(model: nn.Module, cfg: IMSEConfig, owner: str) -> tuple[dict, dict, dict]:
    """Spectralize `model` if needed and freeze it; returns its spectral layers, the adapted ones
    (`cfg.adapt_blocks`) and the probed ones (the last `cfg.diversity_blocks` blocks), by name."""
    if not spectral_layers(model):
        spectralize(model)
    model.requires_grad_(False)
    layers: dict[str, FusedSpectralLinear] = spectral_layers(model)
    blocks = {n: _block_of(n) for n in layers}
    in_blocks = [b for b in blocks.values() if b is not None]
    if not in_blocks:
        raise ValueError(f"{owner}: no spectral layer lives in a `blocks.<i>` module; is this a timm ViT?")
    depth = max(in_blocks) + 1
    adapt = IMSE._resolve_blocks(cfg.adapt_blocks, depth)
    if cfg.diversity_blocks > depth:
        raise ValueError(f"{owner}: diversity_blocks={cfg.diversity_blocks} but the model has {depth} blocks")
    div = set(range(depth - cfg.diversity_blocks, depth))
    adapted = {n: m for n, m in layers.items() if blocks[n] in adapt}
    if not adapted:
        raise ValueError(f"{owner}: no spectral layer in the adapted blocks {sorted(adapt)} (depth {depth})")
    return layers, adapted, {n: m for n, m in layers.items() if blocks[n] in div}


class IMSE(Adapter):
    """IMSE(model, config=None, *, compile=False): spectralizes `model` in place if needed and adapts it on
    every call.

    `compile`: False (eager), True (`torch.compile` with its defaults), a backend name (e.g. "aot_eager")
    or a dict of `torch.compile` keywords; forward + loss are compiled, the update stays eager (module doc).
    `adapter.train()` / `eval()` leave the model in train mode (see `tta.adapter`); adaptation goes on.
    """

    kind = "IMSE"

    def __init__(self, model: nn.Module, config: Optional[IMSEConfig] = None, *,
                 compile: "bool | str | dict" = False) -> None:
        super().__init__()
        cfg = IMSEConfig() if config is None else config
        if not isinstance(cfg, IMSEConfig):
            raise TypeError(f"IMSE: config must be an IMSEConfig, got {type(cfg).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"IMSE: model must be an nn.Module, got {type(model).__name__}")
        self.config = cfg
        self.model = model
        self.layers, self.adapted, probed = select_layers(model, cfg, "IMSE")
        for m in self.adapted.values():
            m.s.requires_grad_(True)
        self.probe = DiversityProbe(probed) if cfg.diversity_weight > 0 else None
        self.optimizer = SAM([m.s for m in self.adapted.values()], torch.optim.Adam, rho=cfg.rho,
                             adaptive=False, lr=cfg.lr, betas=cfg.betas)
        self._start_codes = self._codes()
        self._start_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.bank = CodeBank(self._start_codes, cfg.retrieval, cfg.shift_threshold, cfg.stats_momentum,
                             cfg.stats_window, cfg.temperature, cfg.max_entries, cfg.bank_policy)
        device = next(iter(self.adapted.values())).s.device
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)  # device counters (no sync)
        self._taken = torch.zeros((), dtype=torch.int64, device=device)
        self._compiled = compile_fn(self._forward_loss, compile, "IMSE")
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

    @property
    def skipped_steps(self) -> int:
        """Updates skipped for a non-finite loss or gradient (a device counter: reading it syncs)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped.fill_(int(value))

    @property
    def steps_taken(self) -> int:
        """SAM updates applied (a device counter: reading it syncs)."""
        return int(self._taken)

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:
        self._taken.fill_(int(value))

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

    def _forward_loss(self, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, L, reliable mask) with the mask `keep & (H < E0)`; what `compile=True` compiles.

        The probe's capture is opened by the caller (outside a compiled region); the moments are taken here."""
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        mask = keep & reliable_mask(entropy.detach(), entropy_threshold(logits.shape[1], self.config.entropy_margin))
        loss = _masked_mean(entropy, mask)  # 0 (still in the graph) when none is reliable
        if self.probe is not None:
            div = diversity_loss(self.probe.take(), self.config.diversity_ratio, self.config.diversity_blocks)
            loss = loss - self.config.diversity_weight * div
        return logits, loss, mask

    @torch.enable_grad()
    def _pass(self, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fn = self._forward_loss if self._compiled is None else self._compiled
        if self._compiled is not None:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(keep, 0)
        if self.probe is None:
            return fn(x, keep)
        with self.probe.capture():
            return fn(x, keep)

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        """One SAM update (docs/design.md §6, steps 2–6) without a host sync; returns the first logits."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        logits, loss, mask = self._pass(x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        loss.backward()
        norm = opt.grad_norm()
        ok = torch.isfinite(loss.detach() + norm)
        opt.first_step(zero_grad=True, ok=ok, grad_norm=norm)  # no ascent where not ok

        _, loss2, _ = self._pass(x, mask)  # the first pass's reliable set, filtered again
        loss2.backward()
        ok = ok & torch.isfinite(loss2.detach() + opt.grad_norm())
        opt.second_step(zero_grad=True, ok=ok)  # restore s, then Adam only where ok
        self._taken += ok
        self._skipped += ~ok
        return logits.detach()


def _masked_mean(entropy: Tensor, mask: Tensor) -> Tensor:
    """Mean of `entropy` over `mask` (0 when it is empty): `reliable_entropy` without boolean indexing."""
    return torch.where(mask, entropy, 0).sum() / mask.sum().clamp_min(1)
