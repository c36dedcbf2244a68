"""`IMSE`: test-time adaptation of the singular values of a spectralized ViT (docs/design.md, section 6).

Per batch the code bank may detect a shift and retrieve a code (section 7), then one SAM update of the adapted
blocks' `s` on the reliable entropy minus λ times the diversity loss, with no host sync but the bank's decision.
`compile=` runs forward + loss through `torch.compile`; `process_group=` adapts data-parallel (section 9).
"""
import copy
import dataclasses
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..losses import ExpertMoments, diversity_loss, entropy_threshold, reliable_mask, softmax_entropy
from ..optim import SAM
from .adapter import AdapterStateError, check_optimizer_state
from .code_bank import BankEvent, CodeBank, Retrieval
from .config import IMSEConfig
from .distributed import digest, model_digests
from .diversity_probe import DiversityProbe
from .domain_stats import DomainStats, image_moments, patch_embedding_tokens
from .method import Method, source_images
from .parameters import select_layers


class IMSE(Method):
    """IMSE(model, config=None, *, compile=False, source=None, process_group=None, **fields): spectralizes
    `model` in place if needed and adapts it on every call.

    `compile`: False (eager), True (`torch.compile` with its defaults), a backend name (e.g. "aot_eager")
    or a dict of `torch.compile` keywords; forward + loss are compiled, the update stays eager (module doc).
    `source`: clean images for the code bank's source entry (`prepare`, also `source_statistics`).
    `process_group`: data-parallel over these ranks (module doc); every rank calls the adapter on every batch.
    `adapter.train()` / `eval()` leave the model in train mode (see `tta.adapter`); adaptation goes on.
    """

    kind = "IMSE"
    config_class = IMSEConfig
    uses_source = True
    data_parallel = True

    def __init__(self, model: nn.Module, config: Optional[IMSEConfig] = None, *, compile: "bool | str | dict" = False,
                 source: Optional[Iterable] = None, process_group=None, **fields) -> None:
        super().__init__(model, config, compile=compile, source=source, process_group=process_group, **fields)

    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        cfg = self.config
        self.layers, self.adapted, self._probed = select_layers(model, cfg.adapt_blocks, cfg.diversity_blocks, "IMSE")
        model.train()  # as the official code; timm ViTs have no batch statistics
        return [(f"{n}.s", m.s) for n, m in self.adapted.items()]

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return SAM(params, torch.optim.Adam, rho=self.config.rho, adaptive=False, lr=self.lr, betas=self.config.betas)

    def _setup(self) -> None:
        cfg = self.config
        self.probe = DiversityProbe(self._probed) if cfg.diversity_weight > 0 else None
        del self._probed
        self._start_codes = self._codes()
        self.bank = CodeBank(self._start_codes, cfg.retrieval, cfg.shift_threshold, cfg.stats_momentum,
                             cfg.stats_window, cfg.temperature, cfg.max_entries, cfg.bank_policy,
                             distance=cfg.distance, retrieval_distance=cfg.retrieval_distance,
                             partial_batch=cfg.partial_batch)
        if self._comm is not None:
            self._comm.check_same({**model_digests(self.model), "IMSE config": digest(dataclasses.asdict(cfg)),
                                   "adapted layers": digest(list(self.adapted))})

    def _compile_target(self):
        return self._forward_loss if self._comm is None else self._forward_stats

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
            self._episode_start()
        self._observe(x)
        if not self.bank.adapting:  # after a *_no_adapt retrieval: predict with the code in place, no update
            with torch.no_grad():
                return self.model(x)
        logits = None
        for _ in range(self.config.steps):
            logits = self._step(x)
        return logits

    def _episode_start(self) -> None:
        """Episodic: the start codes and a fresh optimizer before every batch; the bank goes on."""
        self._restore(self._start_codes, reset_optimizer=True)

    def _reset_state(self) -> None:
        """The bank back to its source entry only."""
        self.bank.reset()

    def source_statistics(self, batches: Iterable) -> DomainStats:
        """The same as `prepare(batches)`: entry 0's descriptor from clean source images."""
        return self.prepare(batches)

    @torch.no_grad()
    def _prepare(self, batches: Iterable) -> DomainStats:
        """Record entry 0's descriptor from clean source images; EMA over windows as during the stream (the
        official code)."""
        tracker = self.bank.tracker
        tracker.reset()
        for x in source_images(batches, "source_statistics"):
            tracker.observe(self._bank_input(x), detect=False)
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
                "counters": self._counters(), "optimizer": self.optimizer.state_dict(),
                "bank": self.bank.state_dict()}

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            self._check_config_state(state["config"])
            for key, own in (("layers", list(self.layers)), ("adapted", list(self.adapted))):
                if list(state[key]) != own:
                    diff = sorted(set(state[key]) ^ set(own))[:6]
                    raise AdapterStateError(f"IMSE: the state's {key} spectral layers differ from this model's "
                                            f"({len(state[key])} vs {len(own)}; differences: {diff})")
            self._check_counters(state["counters"])
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
        self._start_params = [self._start_codes[n].to(m.s) for n, m in self.adapted.items()]
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
        found = self.bank.observe(self._bank_input(x), self._snapshot)
        if found is not None:
            how = self.config.optimizer_on_retrieval  # reset | load | continue (keep the optimizer as it is)
            load = how == "load" and found.optimizer_state is not None
            self._restore(found.codes, reset_optimizer=how != "continue",
                          optimizer_state=found.optimizer_state if load else None)
        return found

    def _bank_input(self, x: Tensor):
        """What the code bank observes: the patch tokens, or with a process group every rank's per-image
        moments in rank order (the tracker of one process on the concatenated batch)."""
        tokens = patch_embedding_tokens(self.model, x)
        if self._comm is None:
            return tokens
        count, mean, m2 = image_moments(tokens)
        rows = self._comm.all_gather_rows(torch.cat([count[:, None], mean, m2], 1), "domain moments")
        c = mean.shape[1]
        return rows[:, 0], rows[:, 1:1 + c], rows[:, 1 + c:]

    def _forward_stats(self, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, list[ExpertMoments], Tensor]:
        """(logits, Σ reliable H, reliable count, probed layers' moments, reliable mask), the mask being
        `keep & (H < E0)`: the batch's additive statistics, of which L is a function.

        The probe's capture is opened by the caller (outside a compiled region); the moments are taken here."""
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        mask = keep & reliable_mask(entropy.detach(), entropy_threshold(logits.shape[1], self.config.entropy_margin))
        moments = self.probe.take() if self.probe is not None else []
        return logits, torch.where(mask, entropy, 0).sum(), mask.sum(), moments, mask

    def _loss(self, ent_sum: Tensor, count: Tensor, moments: list[ExpertMoments]) -> Tensor:
        """L = Σ reliable H / max(count, 1) − λ · L_div(moments); 0 (in the graph) when none is reliable."""
        loss = ent_sum / count.clamp_min(1)
        if self.probe is not None:
            div = diversity_loss(moments, self.config.diversity_ratio, self.config.diversity_blocks)
            loss = loss - self.config.diversity_weight * div
        return loss

    def _forward_loss(self, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, L, reliable mask); what `compile=True` compiles (one process)."""
        logits, ent_sum, count, moments, mask = self._forward_stats(x, keep)
        return logits, self._loss(ent_sum, count, moments), mask

    def _global_loss(self, ent_sum: Tensor, count: Tensor, moments: list[ExpertMoments]) -> tuple[Tensor, Tensor]:
        """(L of the global batch, detached; this rank's share of it to backpropagate).

        One all-reduce (float64) of the additive statistics gives the global ones; L is the one-process
        function of them. The share is linear in this rank's statistics with the global L's partial
        derivatives as coefficients, so the ranks' gradients of their shares sum to the global L's gradient."""
        local = [ent_sum.detach().reshape(1), count.reshape(1)]
        for m in moments:
            local += [m.sum.detach(), m.sum_sq.detach(), torch.tensor([float(m.count)], device=m.sum.device)]
        sizes = [t.numel() for t in local]
        total = self._comm.all_reduce_sum_(torch.cat([t.to(torch.float64) for t in local]), "step statistics")
        parts = total.split(sizes)
        g_ent, g_count = parts[0][0].to(ent_sum.dtype), parts[1][0]
        share = ent_sum / g_count.clamp_min(1).to(ent_sum.dtype)
        loss = g_ent / g_count.clamp_min(1).to(ent_sum.dtype)
        if self.probe is not None:
            leaves = [(parts[2 + 3 * i].to(m.sum.dtype).requires_grad_(True),
                       parts[3 + 3 * i].to(m.sum_sq.dtype).requires_grad_(True), int(parts[4 + 3 * i][0]))
                      for i, m in enumerate(moments)]
            with torch.enable_grad():
                div = diversity_loss([ExpertMoments(s, q, n) for s, q, n in leaves], self.config.diversity_ratio,
                                     self.config.diversity_blocks)
                grads = torch.autograd.grad(div, [t for s, q, _ in leaves for t in (s, q)])
            w = self.config.diversity_weight
            loss = loss - w * div.detach()
            for m, gs, gq in zip(moments, grads[0::2], grads[1::2]):
                share = share - w * ((gs * m.sum).sum() + (gq * m.sum_sq).sum())
        return loss, share

    @torch.no_grad()
    def _all_reduce_grads(self) -> None:
        """Sum the gradients of the adapted `s` over the ranks (one flat buffer; a missing gradient is 0)."""
        ps = [m.s for m in self.adapted.values()]
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self._comm.all_reduce_sum_(torch.cat([p.grad.reshape(-1) for p in ps]), "gradients of s")
        for p, g in zip(ps, flat.split([p.numel() for p in ps])):
            p.grad.copy_(g.view_as(p))

    @torch.enable_grad()
    def _pass(self, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, L, reliable mask); `L.backward()` leaves the global gradient in `s.grad`. With a process
        group L is the global loss (detached) and this rank's share was backpropagated here."""
        fn = (self._forward_loss if self._comm is None else self._forward_stats) if self._compiled is None \
            else self._compiled
        if self._compiled is not None:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(keep, 0)
            torch.compiler.cudagraph_mark_step_begin()  # mode="reduce-overhead": each pass is a new graph step
        if self.probe is None:
            out = fn(x, keep)
        else:
            with self.probe.capture():
                out = fn(x, keep)
        if self._compiled is not None:  # CUDA-graph outputs are overwritten by the next replay: keep copies
            out = (out[0].detach().clone(), *out[1:-1], out[-1].clone())
        if self._comm is None:
            out[1].backward()
            return out
        logits, ent_sum, count, moments, mask = out
        loss, share = self._global_loss(ent_sum, count, moments)
        share.backward()
        self._all_reduce_grads()
        return logits, loss, mask

    @torch.enable_grad()
    def _step(self, x: Tensor) -> Tensor:
        """One SAM update (docs/design.md §6, steps 2–6) without a host sync; returns the first logits."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        logits, loss, mask = self._pass(x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
        norm = opt.grad_norm()
        ok = torch.isfinite(loss.detach() + norm)
        opt.first_step(zero_grad=True, ok=ok, grad_norm=norm)  # no ascent where not ok

        _, loss2, _ = self._pass(x, mask)  # the first pass's reliable set, filtered again
        ok = ok & torch.isfinite(loss2.detach() + opt.grad_norm())
        opt.second_step(zero_grad=True, ok=ok)  # restore s, then Adam only where ok
        self._count(ok)
        return logits.detach()

