"""`MultiStreamIMSE`: K independent IMSE streams adapted in one batched forward/backward (docs/design.md, section 8).

`logits = adapter(x, streams)`: every adapted layer holds a (K, r) code table and the model runs inside
`stream_codes`, so the streams share the GEMMs. It equals K separate `IMSE` adapters, each given its own samples
(per-stream losses, SAM radius, Adam, code bank); `process_group` shards the streams across ranks (section 9).
"""
import copy
import dataclasses
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import stream_codes as select_codes
from ..losses import entropy_threshold, lowest_k, softmax_entropy
from ..optim import SAM, RowAdam
from .adapter import Adapter, AdapterStateError, differences
from .code_bank import BankEvent, CodeBank
from .compile_option import compile_fn
from .config import IMSEConfig, with_defaults
from .distributed import GroupComm, digest, model_digests
from .diversity_probe import DiversityProbe
from .domain_stats import DomainStats, patch_embedding_tokens, stats_from_state, stats_state
from .lr_scaling import scaled_lr
from .method import resolve_config, source_images
from .parameters import select_layers

__all__ = ["MultiStreamIMSE"]


class _StreamMoments:
    """Per-stream (Σa, Σa², rows) of one probed layer call: tensors (P, r), (P, r), (P, 1)."""
    __slots__ = ("sum", "sum_sq", "count")

    def __init__(self, s: Tensor, sq: Tensor, count: Tensor) -> None:
        self.sum, self.sum_sq, self.count = s, sq, count


class MultiStreamIMSE(Adapter):
    """MultiStreamIMSE(model, num_streams, config=None, max_group_samples=None, *, compile=False,
    process_group=None, stream_owner=None); `logits = adapter(x, streams)`.

    Equals `num_streams` separate `IMSE(model, config)` adapters, stream k's given only the samples with
    `streams == k` (docs/design.md §8). `streams` is int64 of shape (B,) with values in [0, num_streams).
    `max_group_samples`: process the batch in groups of whole streams of at most this many samples
    (a bigger stream forms its own group); None (default) runs every stream in one group.
    `process_group`, `stream_owner` (a sequence: stream k -> rank): this rank holds `owned_streams` only
    (module doc); `num_streams` is then the number it holds. `compile`: as IMSE's (module doc).
    """

    kind = "MultiStreamIMSE"

    def __init__(self, model: nn.Module, num_streams: int, config: Optional[IMSEConfig] = None,
                 max_group_samples: Optional[int] = None, *, compile: "bool | str | dict" = False,
                 process_group=None, stream_owner: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        cfg = resolve_config(IMSEConfig, config, {}, "MultiStreamIMSE")
        if not isinstance(model, nn.Module):
            raise TypeError(f"MultiStreamIMSE: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
            raise ValueError(f"MultiStreamIMSE: num_streams must be an int >= 1, got {num_streams!r}")
        if cfg.retrieval.endswith("_no_adapt"):
            raise ValueError(f"MultiStreamIMSE: retrieval={cfg.retrieval!r} (stop adapting after a retrieval) is not "
                             "supported per stream; use IMSE for it, or a retrieval mode without _no_adapt")
        if max_group_samples is not None and (isinstance(max_group_samples, bool)
                                              or not isinstance(max_group_samples, int) or max_group_samples < 1):
            raise ValueError(f"MultiStreamIMSE: max_group_samples must be None or an int >= 1, "
                             f"got {max_group_samples!r}")
        self.config, self.model, self.max_group_samples = cfg, model, max_group_samples
        self._compiled = compile_fn(self._model_forward, compile, "MultiStreamIMSE")
        self.owned_streams = self._owned(num_streams, process_group, stream_owner)
        self._slot_of = {k: i for i, k in enumerate(self.owned_streams)}
        self._sharded = process_group is not None
        num_streams = len(self.owned_streams)
        self.layers, self.adapted, probed = select_layers(model, cfg.adapt_blocks, cfg.diversity_blocks,
                                                          "MultiStreamIMSE")
        stray = [n for n, m in self.layers.items() if n not in self.adapted and m.codes is not None]
        if stray:
            raise ValueError(f"MultiStreamIMSE: layers outside the adapted blocks hold code tables: {stray[:4]}; "
                             "call disable_codes() on them first")
        self._start_codes = {n: m.s.detach().clone() for n, m in self.layers.items()}
        fields = None if process_group is None else {  # before the code tables, whose size is per rank
            **model_digests(model), "config": digest(dataclasses.asdict(cfg)), "stream map": digest(self._owner_map)}
        for m in self.adapted.values():
            m.enable_codes(num_streams).requires_grad_(True)
        self.probe = DiversityProbe(probed, moments_fn=self._stream_moments) if cfg.diversity_weight > 0 else None
        self._slots: Optional[Tensor] = None  # per sample of the running forward: its stream's slot
        self._num_slots = 0
        device = next(iter(self.adapted.values())).s.device
        self.lr = scaled_lr(cfg.lr, cfg.lr_scaling, cfg.batch_size, cfg.lr_batch1_factor)
        self.adam = RowAdam({n: (num_streams, m.rank) for n, m in self.adapted.items()}, device, self.lr, cfg.betas)
        template = SAM([torch.zeros(m.rank) for m in self.adapted.values()], torch.optim.Adam, rho=cfg.rho,
                       adaptive=False, lr=self.lr, betas=cfg.betas)
        self._param_groups = template.state_dict()["param_groups"]  # what IMSE's optimizer state carries
        self._source_stats: Optional[DomainStats] = None
        self.banks: list[CodeBank] = [self._new_bank() for _ in range(num_streams)]
        self.steps_taken = [0] * num_streams
        self.skipped_steps = [0] * num_streams
        if process_group is not None:
            GroupComm(process_group, "MultiStreamIMSE").check_same(fields)
        model.train()

    def _owned(self, total: int, group, owner) -> list[int]:
        """The global ids of the streams this adapter holds (all of them without a process group)."""
        if group is None:
            if owner is not None:
                raise ValueError("MultiStreamIMSE: stream_owner needs a process_group")
            self._owner_map = None
            return list(range(total))
        comm = GroupComm(group, "MultiStreamIMSE")
        owner = [k % comm.world_size for k in range(total)] if owner is None else [int(q) for q in owner]
        if len(owner) != total or any(not 0 <= q < comm.world_size for q in owner):
            raise ValueError(f"MultiStreamIMSE: stream_owner must give each of the {total} streams a rank in "
                             f"[0, {comm.world_size}), got {list(owner)}")
        self._owner_map = owner
        mine = [k for k, q in enumerate(owner) if q == comm.rank]
        if not mine:
            raise ValueError(f"MultiStreamIMSE: rank {comm.rank} owns no stream ({total} streams over "
                             f"{comm.world_size} ranks); give every rank at least one")
        return mine

    # ------------------------------------------------------------------ public
    @property
    def num_streams(self) -> int:
        return len(self.banks)

    @property
    def events(self) -> list[list[BankEvent]]:
        """Per stream, its code bank's log."""
        return [b.events for b in self.banks]

    def stream_codes(self, k: int) -> dict[str, Tensor]:
        """Stream k's code as IMSE holds it: every spectral layer's `s`, row k for the adapted ones (copies)."""
        return self._slot_codes(self._stream_index(k))

    def stream_optimizer_state(self, k: int) -> dict:
        """Stream k's Adam state in the layout of IMSE's `optimizer.state_dict()` (copies)."""
        return self._slot_optimizer_state(self._stream_index(k))

    def _slot_codes(self, i: int) -> dict[str, Tensor]:
        return {n: (m.codes[i] if n in self.adapted else m.s).detach().clone() for n, m in self.layers.items()}

    def _slot_optimizer_state(self, i: int) -> dict:
        return self.adam.export(i, list(self.adapted), self._param_groups)

    def forward(self, x: Tensor, streams: Tensor) -> Tensor:
        """Predict `x` (the first forward's logits, detached, as IMSE) and adapt every stream present in it."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("MultiStreamIMSE adapts with gradients: call it outside torch.inference_mode()")
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise TypeError(f"MultiStreamIMSE: expected an image batch (B, C, H, W), "
                            f"got {getattr(x, 'shape', type(x))}")
        streams = self._check_streams(streams, x)
        present = torch.unique(streams).tolist()
        if self.config.episodic:
            for k in present:
                self._restore(k, self._start_codes, None)
        tokens = patch_embedding_tokens(self.model, x)
        for k in present:
            self._observe(k, tokens[streams == k])
        out = None
        for group in self._groups(streams, present):
            xg, sg = (x, streams) if group is None else (x[group], streams[group])
            logits = None
            for _ in range(self.config.steps):
                logits = self._step(xg, sg)
            if group is None:
                return logits
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out[group] = logits
        return out

    def add_stream(self) -> int:
        """A new stream (the last index), starting from the source codes with a fresh optimizer and bank."""
        if self._sharded:
            raise RuntimeError("MultiStreamIMSE: with a process_group the streams are fixed at construction")
        k = self.num_streams
        with torch.no_grad():
            for n, m in self.adapted.items():
                table = torch.cat([m.codes.detach(), self._start_codes[n].to(m.codes)[None]])
                m.codes = nn.Parameter(table, requires_grad=True)
        self.adam.grow()
        self.banks.append(self._new_bank())
        self.steps_taken.append(0)
        self.skipped_steps.append(0)
        self.owned_streams.append(k)
        self._slot_of[k] = k
        return k

    def reset_stream(self, k: int) -> None:
        """Stream k back to the start: source codes, fresh optimizer, bank with its source entry, counters 0."""
        k = self._stream_index(k)
        self._restore(k, self._start_codes, None)
        self.banks[k].reset()
        self.steps_taken[k] = self.skipped_steps[k] = 0

    def reset(self) -> None:
        """Every stream back to the start (`reset_stream` for each)."""
        for k in self.owned_streams:
            self.reset_stream(k)

    def prepare(self, source: Iterable) -> DomainStats:
        """Clean source images for every stream's code bank: the same as `source_statistics` (the methods'
        one entry point for source data, `tta.method`)."""
        return self.source_statistics(source)

    @torch.no_grad()
    def source_statistics(self, batches: Iterable) -> DomainStats:
        """Entry 0's descriptor for every stream's bank (and streams added later), from clean source images,
        as `IMSE.source_statistics`; every bank restarts."""
        tracker = copy.deepcopy(self.banks[0].tracker)
        tracker.reset()
        for x in source_images(batches, "source_statistics"):
            tracker.observe(patch_embedding_tokens(self.model, x), detect=False)
        stats = tracker.summary()
        if stats is None:
            raise ValueError("source_statistics: no images were given")
        self._source_stats = DomainStats(stats.mean.clone(), stats.var.clone())
        for bank in self.banks:
            bank.set_source_stats(stats)
        return stats

    def save_bank(self, path, stream: int) -> None:
        """Write stream `stream`'s code bank to a safetensors file (the format of `IMSE.save_bank`), atomically."""
        self.banks[self._stream_index(stream)].save(path)

    def load_bank(self, path, stream: int) -> None:
        """Replace stream `stream`'s code bank with a file's (an IMSE bank file of this model fits);
        on any failure nothing changes."""
        self.banks[self._stream_index(stream)].load(path, channels=getattr(self.model, "embed_dim", None))

    # ------------------------------------------------------------------ state (tta.adapter)
    def _adaptation_state(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "layers": list(self.layers), "adapted": list(self.adapted),
                "num_streams": self.num_streams, "owned_streams": list(self.owned_streams),
                "counters": {"steps_taken": list(self.steps_taken), "skipped_steps": list(self.skipped_steps)},
                "optimizer": self.adam.state_dict(), "source_stats": stats_state(self._source_stats),
                "banks": [b.state_dict() for b in self.banks]}

    def _check_header(self, state) -> None:
        super()._check_header(state)
        if state.get("num_streams") != self.num_streams:  # before the model check reports the table shapes
            raise AdapterStateError(f"MultiStreamIMSE: the state has {state.get('num_streams')!r} streams, this "
                                    f"adapter {self.num_streams} (add_stream() to match)")
        owned = state.get("owned_streams", list(range(self.num_streams)))
        if list(owned) != self.owned_streams:
            raise AdapterStateError(f"MultiStreamIMSE: the state holds streams {list(owned)}, this adapter "
                                    f"{self.owned_streams} (a rank loads the state it saved)")

    def _check_adaptation_state(self, state: dict) -> None:
        who = "MultiStreamIMSE"
        try:
            found, want = with_defaults(state["config"]), dataclasses.asdict(self.config)
            if found != want:
                raise AdapterStateError(f"{who}: the state was saved with another config: "
                                        f"{'; '.join(differences(found, want))}")
            for key, own in (("layers", list(self.layers)), ("adapted", list(self.adapted))):
                if list(state[key]) != own:
                    diff = sorted(set(state[key]) ^ set(own))[:6]
                    raise AdapterStateError(f"{who}: the state's {key} spectral layers differ from this model's "
                                            f"({len(state[key])} vs {len(own)}; differences: {diff})")
            k = self.num_streams
            for name in ("steps_taken", "skipped_steps"):
                c = state["counters"][name]
                if not (isinstance(c, list) and len(c) == k and all(type(v) is int for v in c)):
                    raise AdapterStateError(f"{who}: malformed counters {name!r} in the state: {c!r}")
            opt = state["optimizer"]
            steps = opt["steps"]
            if not (isinstance(steps, list) and len(steps) == k and all(type(v) is int and v >= 0 for v in steps)):
                raise AdapterStateError(f"{who}: malformed optimizer step counts in the state: {steps!r}")
            for key in ("exp_avg", "exp_avg_sq"):
                if not isinstance(opt[key], dict) or list(opt[key]) != list(self.adapted):
                    raise AdapterStateError(f"{who}: optimizer {key!r} does not name the adapted layers")
                for n, t in opt[key].items():
                    want_shape = (k, self.adapted[n].rank)
                    if not isinstance(t, Tensor) or tuple(t.shape) != want_shape:
                        raise AdapterStateError(f"{who}: optimizer {key!r} of {n} has shape "
                                                f"{list(getattr(t, 'shape', []))}, expected {list(want_shape)}")
            if not isinstance(state["banks"], list) or len(state["banks"]) != k:
                raise AdapterStateError(f"{who}: the state has no code bank per stream")
            stats_from_state(state["source_stats"])
        except KeyError as err:
            raise AdapterStateError(f"{who}: the adapter state lacks {err}") from err
        except ValueError as err:
            raise AdapterStateError(f"{who}: {err}") from err

    def _load_adaptation_state(self, state: dict) -> None:
        device = next(iter(self.adapted.values())).s.device
        banks = []
        for i, bs in enumerate(state["banks"]):  # into fresh banks: a failure leaves the adapter unchanged
            bank = self._new_bank()
            try:
                bank.load_state_dict(bs)
            except (KeyError, TypeError, ValueError) as err:
                raise AdapterStateError(f"MultiStreamIMSE: the code bank state of stream {i} does not fit: "
                                        f"{err}") from err
            banks.append(bank)
        self.banks = banks
        self._source_stats = stats_from_state(state["source_stats"], device)
        opt = state["optimizer"]
        self.adam.steps = list(opt["steps"])
        for key in ("exp_avg", "exp_avg_sq"):
            getattr(self.adam, key).update({n: t.to(device=device, dtype=torch.float32).clone()
                                            for n, t in opt[key].items()})
        self._start_codes = {n: v.detach().clone() for n, v in banks[0]._source_codes.items()}
        self.steps_taken = list(state["counters"]["steps_taken"])
        self.skipped_steps = list(state["counters"]["skipped_steps"])

    # ------------------------------------------------------------------ internals
    def _new_bank(self) -> CodeBank:
        cfg = self.config
        bank = CodeBank(self._start_codes, cfg.retrieval, cfg.shift_threshold, cfg.stats_momentum,
                        cfg.stats_window, cfg.temperature, cfg.max_entries, cfg.bank_policy,
                        distance=cfg.distance, retrieval_distance=cfg.retrieval_distance,
                        partial_batch=cfg.partial_batch)
        if self._source_stats is not None:
            bank.set_source_stats(self._source_stats)
        return bank

    def _stream_index(self, k) -> int:
        """The slot (row of the code tables, bank index) of global stream id k."""
        if isinstance(k, bool) or not isinstance(k, int) or k not in self._slot_of:
            if self._sharded and isinstance(k, int) and 0 <= k < len(self._owner_map):
                raise IndexError(f"MultiStreamIMSE: stream {k} belongs to rank {self._owner_map[k]}; this rank holds "
                                 f"streams {self.owned_streams}")
            raise IndexError(f"MultiStreamIMSE: stream {k!r} out of range for {self.num_streams} streams")
        return self._slot_of[k]

    def _check_streams(self, streams, x: Tensor) -> Tensor:
        if not isinstance(streams, Tensor):
            raise TypeError(f"MultiStreamIMSE: streams must be an int64 tensor of shape (B,), "
                            f"got {type(streams).__name__}")
        if streams.dtype != torch.int64:
            raise TypeError(f"MultiStreamIMSE: streams must be int64, got {streams.dtype}")
        if streams.dim() != 1 or streams.shape[0] != x.shape[0]:
            raise ValueError(f"MultiStreamIMSE: streams must have shape ({x.shape[0]},) (one per image of x), "
                             f"got {tuple(streams.shape)}")
        if x.shape[0] == 0:
            raise ValueError("MultiStreamIMSE: empty batch")
        streams = streams.to(x.device)
        if self._sharded:  # global ids -> slots
            table = torch.full((len(self._owner_map),), -1, dtype=torch.int64)
            table[torch.tensor(self.owned_streams)] = torch.arange(len(self.owned_streams))
            lo, hi = int(streams.min()), int(streams.max())
            if lo < 0 or hi >= table.numel():
                raise IndexError(f"MultiStreamIMSE: stream indices must be in [0, {table.numel()}), got min {lo}, "
                                 f"max {hi}")
            slots = table.to(x.device)[streams]
            if bool((slots < 0).any()):
                foreign = sorted(set(streams[slots < 0].tolist()))
                raise ValueError(f"MultiStreamIMSE: streams {foreign[:8]} are not held by this rank (it holds "
                                 f"{self.owned_streams}); send each rank only its own streams' samples")
            return slots
        lo, hi = int(streams.min()), int(streams.max())
        if lo < 0 or hi >= self.num_streams:
            raise IndexError(f"MultiStreamIMSE: stream indices must be in [0, {self.num_streams}), got min {lo}, "
                             f"max {hi}")
        return streams

    def _groups(self, streams: Tensor, present: list[int]):
        """None (one group: the whole batch), or per group of whole streams the sample positions (in order)."""
        cap = self.max_group_samples
        if cap is None:
            yield None
            return
        counts = torch.bincount(streams, minlength=self.num_streams).tolist()
        if sum(counts) <= cap:
            yield None
            return
        groups, cur, size = [], [], 0
        for k in present:
            if cur and size + counts[k] > cap:
                groups.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += counts[k]
        groups.append(cur)
        for g in groups:
            member = torch.isin(streams, torch.tensor(g, dtype=streams.dtype, device=streams.device))
            yield member.nonzero().squeeze(1)

    @torch.no_grad()
    def _restore(self, k: int, codes: dict[str, Tensor], optimizer_state: Optional[dict],
                 keep_optimizer: bool = False) -> None:
        for n, m in self.adapted.items():
            m.codes[k].copy_(codes[n])
        if optimizer_state is not None:
            self.adam.load_row(k, list(self.adapted), optimizer_state)
        elif not keep_optimizer:
            self.adam.reset(k)

    def _observe(self, k: int, tokens: Tensor) -> None:
        found = self.banks[k].observe(tokens, lambda: (self._slot_codes(k), self._slot_optimizer_state(k)))
        if found is not None:
            how = self.config.optimizer_on_retrieval  # reset | load | continue, as IMSE
            load = how == "load" and found.optimizer_state is not None
            self._restore(k, found.codes, found.optimizer_state if load else None, keep_optimizer=how == "continue")

    def _stream_moments(self, x: Tensor, Vh: Tensor, h: Optional[Tensor] = None, eps: float = 1e-12) -> _StreamMoments:
        """`expert_alignment_moments`, summed per stream slot instead of over all rows."""
        rows = x.reshape(-1, x.shape[-1])
        if h is None:
            a = F.linear(F.normalize(rows, dim=-1, eps=eps), Vh.to(rows.dtype))
        else:
            a = h / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(eps)
        a = a if a.dtype == torch.float64 else a.float()
        slots = self._slots
        per = rows.shape[0] // slots.shape[0]
        idx = slots.repeat_interleave(per) if per > 1 else slots
        zeros = a.new_zeros(self._num_slots, a.shape[1])
        # an index_add, not bincount (whose data-dependent size would break a compiled graph); exact integers
        count = a.new_zeros(self._num_slots).index_add(0, slots, a.new_ones(slots.shape[0]))[:, None] * per
        return _StreamMoments(zeros.index_add(0, idx, a), zeros.index_add(0, idx, a * a), count)

    def _losses(self, entropy: Tensor, mask: Tensor, slots: Tensor) -> Tensor:
        """Per slot: mean entropy of its reliable samples (0 when none) − λ · its diversity loss; shape (P,)."""
        p = self._num_slots
        picked = torch.where(mask, entropy, torch.zeros_like(entropy))
        total = entropy.new_zeros(p).index_add(0, slots, picked)
        count = torch.bincount(slots[mask], minlength=p).to(entropy.dtype)
        loss = total / count.clamp_min(1)
        if self.probe is not None:
            cfg = self.config
            terms = []
            for m in self.probe.take():
                n = m.count
                std = ((m.sum_sq - m.sum * m.sum / n) / (n - 1)).clamp_min(1e-20).sqrt()
                k = lowest_k(std.shape[1], cfg.diversity_ratio)
                terms.append(std.topk(k, dim=1, largest=False, sorted=False).values.mean(1))
            if not terms:
                raise ValueError("diversity_loss: no layer statistics were captured")
            div = sum(terms[1:], terms[0]) / cfg.diversity_blocks
            loss = loss - cfg.diversity_weight * div.to(loss.dtype)
        return loss

    @torch.enable_grad()
    def _forward(self, x: Tensor, streams: Tensor, slots: Tensor) -> Tensor:
        self._slots = slots
        fn = self._model_forward
        if self._compiled is not None:
            fn = self._compiled
            torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(slots, 0)
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with select_codes(self.model, streams):
                if self.probe is None:
                    return self._copy_out(fn(x))
                with self.probe.capture():
                    return self._copy_out(fn(x))
        finally:
            self._slots = None

    def _model_forward(self, x: Tensor) -> Tensor:
        """What `compile` compiles: the model under the stream selection the caller opened."""
        return self.model(x)

    def _copy_out(self, logits: Tensor) -> Tensor:
        """CUDA-graph outputs are overwritten by the next replay: keep a copy (compiled only)."""
        return logits if self._compiled is None else logits.clone()

    def _grads(self, rows: Tensor) -> dict[str, Tensor]:
        return {n: (m.codes.grad[rows] if m.codes.grad is not None else m.codes.new_zeros(len(rows), m.rank))
                for n, m in self.adapted.items()}

    def _zero_grad(self) -> None:
        for m in self.adapted.values():
            m.codes.grad = None

    @staticmethod
    def _norms(grads: dict[str, Tensor]) -> Tensor:
        """Per slot: ‖g‖₂ over all its rows, as SAM's norm of the per-parameter norms."""
        return torch.linalg.vector_norm(torch.stack([g.norm(p=2, dim=1) for g in grads.values()]), ord=2, dim=0)

    @torch.enable_grad()
    def _step(self, x: Tensor, streams: Tensor) -> Tensor:
        """One SAM update of every stream in the batch (IMSE._step per stream, batched)."""
        present, slots = torch.unique(streams, sorted=True, return_inverse=True)
        plist = present.tolist()
        self._num_slots = len(plist)
        self._zero_grad()
        logits = self._forward(x, streams, slots)
        entropy = softmax_entropy(logits)
        e0 = entropy_threshold(logits.shape[1], self.config.entropy_margin)
        mask = entropy.detach() < e0
        loss = self._losses(entropy, mask, slots)
        loss.sum().backward()
        grads = self._grads(present)
        norms = self._norms(grads)
        ok = torch.isfinite(loss.detach() + norms).tolist()
        self._zero_grad()
        for i, good in enumerate(ok):
            if not good:
                self.skipped_steps[plist[i]] += 1
        live = [i for i, good in enumerate(ok) if good]
        if not live:
            return logits.detach()

        # ascend the healthy streams: s_k ← s_k + ρ·g_k/(‖g_k‖ + 1e-12)
        live_t = torch.tensor(live, dtype=torch.long, device=present.device)
        rows = present[live_t]
        factor = (self.config.rho * (1.0 / (norms[live_t] + 1e-12)))[:, None]
        old = {}
        with torch.no_grad():
            for n, m in self.adapted.items():
                old[n] = m.codes[rows].clone()
                m.codes[rows] = old[n] + grads[n][live_t] * factor.to(m.codes.dtype)

        # second pass on the healthy streams' samples; their first-pass reliable set filtered again
        if len(live) == len(plist):
            keep, x2, s2, mask2 = None, x, streams, mask
        else:
            keep = torch.isin(streams, rows).nonzero().squeeze(1)
            x2, s2, mask2 = x[keep], streams[keep], mask[keep]
        _, slots2 = torch.unique(s2, sorted=True, return_inverse=True)
        self._num_slots = len(live)
        entropy2 = softmax_entropy(self._forward(x2, s2, slots2))
        mask2 = mask2 & (entropy2.detach() < e0)
        loss2 = self._losses(entropy2, mask2, slots2)
        loss2.sum().backward()
        grads2 = self._grads(rows)
        ok2 = torch.isfinite(loss2.detach() + self._norms(grads2)).tolist()
        self._zero_grad()
        with torch.no_grad():
            for n, m in self.adapted.items():
                m.codes[rows] = old[n]  # unperturb every ascended stream
        good_rows = []
        for j, good in enumerate(ok2):
            k = plist[live[j]]
            if good:
                good_rows.append(j)
                self.steps_taken[k] += 1
            else:
                self.skipped_steps[k] += 1
        if good_rows:
            sel = torch.tensor(good_rows, dtype=torch.long, device=rows.device)
            self.adam.step({n: m.codes.data for n, m in self.adapted.items()},
                           {n: g[sel] for n, g in grads2.items()}, [plist[live[j]] for j in good_rows])
        return logits.detach()
