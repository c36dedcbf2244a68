"""`CodeBank`: domain-aware spectral code retrieval of IMSE (docs/design.md, section 7).

Entries pair a domain descriptor with that domain's code (every spectral layer's `s`) and optimizer state;
entry 0 is the source. On a shift the ended domain's code is stored and a code is retrieved (`top1`, `mix`,
`mean`, `continual`, `*_no_adapt`; official decompose_svd.py `_apply_mode_generic`), within an optional bound.
"""
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .adapter import differences
from .bank_io import BankFileError, read_bank_file, write_bank_file
from .config import BANK_POLICIES, RETRIEVAL_MODES, canonical_distance
from .domain_stats import DISTANCE_FNS, DomainStats, DomainTracker, stats_from_state, stats_state

#: CodeBank.config() keys added after the first state format, with the value an older state implies.
_ADDED_SETTINGS = {"distance": "skl", "retrieval_distance": "skl", "partial_batch": "auto"}

Codes = dict[str, Tensor]
Snapshot = Callable[[], tuple[Codes, Optional[dict]]]


@dataclass
class BankEntry:
    """One domain: descriptor (None for a source entry without statistics), code, optimizer state."""
    entry_id: int
    stats: Optional[DomainStats]
    codes: Codes
    optimizer_state: Optional[dict] = None
    created_at: int = -1  # test batch index at which the entry was stored (-1: source)
    weight: float = 1.0  # how many stored domains it stands for (merges add up)


@dataclass(frozen=True)
class BankEvent:
    """kind: source | shift | retrieve | drop | merge. batch: test batch index (-1 before the stream)."""
    batch: int
    kind: str
    entry: Optional[int] = None
    kl: Optional[float] = None  # the shift distance (symmetric KL by default)
    distances: dict = field(default_factory=dict)  # entry id → retrieval distance
    weights: dict = field(default_factory=dict)  # entry id → retrieval weight
    merged: tuple = ()


@dataclass(frozen=True)
class Retrieval:
    """Codes to load into the model, from which entries and with which weights."""
    codes: Codes
    entry: int  # the nearest entry
    distances: dict
    weights: dict
    optimizer_state: Optional[dict]  # the nearest entry's
    adapt: bool = True  # False for a *_no_adapt mode: adaptation stops from here on


class CodeBank:
    """Entries + the domain tracker. `source_codes` is every spectral layer's pretrained `s` (entry 0);
    `window`, `momentum`, `shift_threshold`, `distance` (shift detection) and `partial_batch` configure the
    `DomainTracker`; `retrieval_distance` (None: `distance`) ranks and weights the entries and picks the
    pair to merge; `max_entries` counts entry 0. `adapting` turns False after the first retrieval of a
    *_no_adapt mode (see `IMSEConfig` for every setting)."""

    def __init__(self, source_codes: Codes, retrieval: str = "top1", shift_threshold: float = 0.05,
                 momentum: float = 0.8, window: int = 64, temperature: float = 1.0,
                 max_entries: Optional[int] = None, policy: str = "keep_all", *, distance: str = "skl",
                 retrieval_distance: Optional[str] = None, partial_batch: str = "auto") -> None:
        if retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"CodeBank: retrieval must be one of {RETRIEVAL_MODES}, got {retrieval!r}")
        if policy not in BANK_POLICIES:
            raise ValueError(f"CodeBank: policy must be one of {BANK_POLICIES}, got {policy!r}")
        if (max_entries is None) != (policy == "keep_all") or (max_entries is not None and max_entries < 2):
            raise ValueError(f"CodeBank: policy {policy!r} with max_entries={max_entries} (keep_all takes no bound; "
                             "the others need max_entries >= 2)")
        if not source_codes:
            raise ValueError("CodeBank: the source code is empty (no spectral layers?)")
        self.retrieval, self.temperature = retrieval, float(temperature)
        self.max_entries, self.policy = max_entries, policy
        self.tracker = DomainTracker(window, momentum, shift_threshold, distance=distance, partial_batch=partial_batch)
        self.retrieval_distance = self.tracker.distance if retrieval_distance is None else \
            canonical_distance(retrieval_distance, "CodeBank: retrieval_distance")
        self._retrieval_fn = DISTANCE_FNS[self.retrieval_distance]
        self._source_codes = {k: v.detach().clone() for k, v in source_codes.items()}
        self._source_stats: Optional[DomainStats] = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the source entry alone (with its statistics if recorded), an empty log and batch 0."""
        self.entries = [BankEntry(0, self._source_stats, dict(self._source_codes))]
        self.events: list[BankEvent] = []
        if self._source_stats is not None:
            self.events.append(BankEvent(-1, "source", 0))
        self.tracker.reset()
        self.batch = 0
        self._next_id = 1
        self._pending = False
        self.adapting = True

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._source_codes.items()}

    def set_source_stats(self, stats: DomainStats) -> None:
        """Entry 0's descriptor (clean source images); the stream restarts."""
        self._source_stats = DomainStats(stats.mean.clone(), stats.var.clone())
        self.reset()

    # ------------------------------------------------------------------ stream
    def observe(self, tokens: Tensor, snapshot: Snapshot) -> Optional[Retrieval]:
        """Process one test batch's patch tokens (B, T, C), or their `image_moments` (see `DomainTracker.observe`).

        On a shift, `snapshot()` gives the (codes, optimizer state) adapted on the domain that
        ended, stored with its descriptor. Returns a `Retrieval` on the first full window of a
        new domain (retrieval enabled), else None.
        """
        batch, self.batch = self.batch, self.batch + 1
        obs = self.tracker.observe(tokens)
        if obs.shift:
            codes, opt_state = snapshot()
            if not self.adapting:
                opt_state = None  # not adapted on that domain (a *_no_adapt mode): nothing to resume
            entry = BankEntry(self._next_id, obs.ended, {k: v.detach().clone() for k, v in codes.items()},
                              opt_state, created_at=batch)
            self._next_id += 1
            self.entries.append(entry)
            self.events.append(BankEvent(batch, "shift", entry.entry_id, kl=obs.kl))
            self._enforce_bound(batch)
            self._pending = True
        if self._pending and obs.stats is not None and self.retrieval != "none":
            self._pending = False
            result = self.retrieve(obs.stats)
            if result is not None:
                self.events.append(BankEvent(batch, "retrieve", result.entry, distances=result.distances,
                                             weights=result.weights))
                if not result.adapt:
                    self.adapting = False
            return result
        return None

    def distances(self, stats: DomainStats) -> dict[int, float]:
        """The retrieval distance from every entry that has a descriptor to `stats`, by entry id."""
        return {e.entry_id: self._retrieval_fn(e.stats, stats) for e in self.entries if e.stats is not None}

    def retrieve(self, stats: DomainStats, mode: Optional[str] = None) -> Optional[Retrieval]:
        """The code for a domain described by `stats` (mode defaults to the bank's); None for "none" or
        when no entry has a descriptor."""
        mode = mode or self.retrieval
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"CodeBank.retrieve: mode must be one of {RETRIEVAL_MODES}, got {mode!r}")
        dist = self.distances(stats)
        if not dist or mode == "none":
            return None
        base_mode = mode[:-len("_no_adapt")] if mode.endswith("_no_adapt") else mode
        by_id = {e.entry_id: e for e in self.entries}
        ids = list(dist)
        d = torch.tensor([dist[i] for i in ids], dtype=torch.float64)
        nearest = ids[int(d.argmin())]
        s0 = self.entries[0].codes
        if base_mode in ("top1", "continual"):
            pick = nearest if base_mode == "top1" else self.entries[-1].entry_id
            codes = {k: v.clone() for k, v in by_id[pick].codes.items()}
            weights = {pick: 1.0}
        else:
            if base_mode == "mix":
                w = torch.softmax(-d / self.temperature, dim=0)
                weights = {i: float(wi) for i, wi in zip(ids, w)}
            else:  # mean: every stored code, with or without a descriptor (official: the whole code list)
                weights = {e.entry_id: 1.0 / len(self.entries) for e in self.entries}
            codes = {name: v + sum(float(wi) * (by_id[i].codes[name] - v) for i, wi in weights.items())
                     for name, v in s0.items()}
        return Retrieval(codes, nearest, dist, weights, by_id[nearest].optimizer_state,
                         adapt=not mode.endswith("_no_adapt"))

    # ------------------------------------------------------------------ bound
    def _enforce_bound(self, batch: int) -> None:
        while self.max_entries is not None and len(self.entries) > self.max_entries:
            if self.policy == "drop_oldest":
                dropped = self.entries.pop(1)
                self.events.append(BankEvent(batch, "drop", dropped.entry_id))
            else:
                self._merge_nearest(batch)

    def _merge_nearest(self, batch: int) -> None:
        """The two closest non-source entries become one: moment-matched descriptor (weighted by
        `weight`), the newer entry's code and optimizer state (in a recurring domain the newer code
        was retrieved from the older one and adapted further)."""
        cands = range(1, len(self.entries))
        best = None
        for a in cands:
            for b in cands:
                if a < b:
                    d = self._retrieval_fn(self.entries[a].stats, self.entries[b].stats)
                    if best is None or d < best[0]:
                        best = (d, a, b)
        _, a, b = best
        old, new = self.entries[a], self.entries[b]
        wa, wb = old.weight, new.weight
        mean = (wa * old.stats.mean + wb * new.stats.mean) / (wa + wb)
        second = (wa * (old.stats.var + old.stats.mean ** 2) + wb * (new.stats.var + new.stats.mean ** 2)) / (wa + wb)
        new.stats = DomainStats(mean, second - mean ** 2)
        new.weight = wa + wb
        del self.entries[a]
        self.events.append(BankEvent(batch, "merge", new.entry_id, kl=best[0], merged=(old.entry_id, new.entry_id)))

    # ------------------------------------------------------------------ state dict
    def config(self) -> dict:
        """The bank's settings; a state loads only into a bank with the same ones."""
        t = self.tracker
        return {"retrieval": self.retrieval, "temperature": self.temperature, "max_entries": self.max_entries,
                "policy": self.policy, "window": t.window, "momentum": t.momentum, "threshold": t.threshold,
                "distance": t.distance, "retrieval_distance": self.retrieval_distance,
                "partial_batch": t.partial_batch}

    def state_dict(self) -> dict:
        """Everything the bank holds (entries, log, stream position, tracker, source code and descriptor) as
        tensors by reference and plain numbers, strings, lists and dicts: `torch.load(weights_only=True)`-safe."""
        return {"config": self.config(), "source_codes": dict(self._source_codes),
                "source_stats": stats_state(self._source_stats),
                "entries": [{"id": e.entry_id, "stats": stats_state(e.stats), "codes": dict(e.codes),
                             "optimizer": e.optimizer_state, "created_at": e.created_at, "weight": e.weight}
                            for e in self.entries],
                "events": [asdict(e) for e in self.events],
                "next_id": self._next_id, "batch": self.batch, "pending": self._pending,
                "adapting": self.adapting, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`. It must fit: same settings, same layers and shapes. Everything is
        checked and converted before the first assignment, so on any error the bank is unchanged. A state
        of an older version (without the settings added since) reads as having their defaults."""
        found, want = {**_ADDED_SETTINGS, **state["config"]}, self.config()
        if found != want:
            raise ValueError(f"CodeBank: the state has other settings: {'; '.join(differences(found, want))}")
        device = next(iter(self._source_codes.values())).device
        shapes = self.layer_shapes

        def codes(c: dict, what: str) -> Codes:
            got = {k: tuple(v.shape) for k, v in c.items()}
            if got != shapes:
                diff = sorted(set(got.items()) ^ set(shapes.items()))[:6]
                raise ValueError(f"CodeBank: {what} does not match this model's spectral layers "
                                 f"(differences, name → shape: {diff})")
            return {k: v.to(device=device, dtype=self._source_codes[k].dtype) for k, v in c.items()}

        source = codes(state["source_codes"], "the source code")
        entries = [BankEntry(int(e["id"]), stats_from_state(e["stats"], device), codes(e["codes"], f"entry {e['id']}"),
                             _to_device(e["optimizer"], device), int(e["created_at"]), float(e["weight"]))
                   for e in state["entries"]]
        if not entries or entries[0].entry_id != 0:
            raise ValueError("CodeBank: the state's first entry is not the source entry 0")
        events = [BankEvent(**dict(e, merged=tuple(e["merged"]))) for e in state["events"]]
        source_stats = stats_from_state(state["source_stats"], device)
        next_id, batch, pending = int(state["next_id"]), int(state["batch"]), bool(state["pending"])
        adapting = state.get("adapting", True)
        if not isinstance(adapting, bool):
            raise ValueError(f"CodeBank: 'adapting' is {adapting!r} in the state, not a bool")
        self.tracker.load_state_dict(state["tracker"], device)  # checks, then assigns: the last step that can fail
        self._source_codes, self._source_stats, self.entries, self.events = source, source_stats, entries, events
        self._next_id, self.batch, self._pending, self.adapting = next_id, batch, pending, adapting

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the entries to a safetensors file (JSON metadata with SHA-256 digests, no pickle).

        Atomic: if the save fails or the process dies, the previous file at `path` is left intact."""
        write_bank_file(path, [{"id": e.entry_id, "created_at": e.created_at, "weight": e.weight,
                                "mean": None if e.stats is None else e.stats.mean,
                                "var": None if e.stats is None else e.stats.var,
                                "codes": e.codes, "optimizer_state": e.optimizer_state} for e in self.entries],
                        self._next_id)

    def load(self, path, channels: Optional[int] = None) -> None:
        """Replace the entries with a file's (the stream restarts).

        The file must fit this bank: same layers and shapes, the same source code (entry 0, i.e. the
        same pretrained weights) and, when known, descriptors of `channels` channels. Raises
        `BankFileError` for a corrupted, truncated or mismatched file. Everything is read, verified
        and converted before the first assignment, so after any failure the bank (entries, events,
        tracker, counters) is exactly as it was. The file is read whole: nothing refers to it afterwards.
        """
        raw, next_id = read_bank_file(path)
        self._check_fits(raw, next_id, channels, path)
        device = next(iter(self._source_codes.values())).device
        self.entries = [self._entry_from_file(e, device) for e in raw]
        self._source_stats = self.entries[0].stats
        self._next_id = next_id
        self.events, self.batch, self._pending, self.adapting = [], 0, False, True
        self.tracker.reset()

    def _check_fits(self, raw: list[dict], next_id: int, channels: Optional[int], path) -> None:
        want = self.layer_shapes
        found = {e["mean"].shape[0] for e in raw if e["mean"] is not None}
        if channels is None and self._source_stats is not None:
            channels = self._source_stats.mean.shape[0]
        if len(found) > 1 or (channels is not None and found and found != {channels}):
            raise BankFileError(f"{path}: descriptors have {sorted(found)} channels, this model's have {channels}")
        for e in raw:
            got = {k: tuple(v.shape) for k, v in e["codes"].items()}
            if got != want:
                diff = sorted(set(got.items()) ^ set(want.items()))[:6]
                raise BankFileError(f"{path}: entry {e['id']} does not match this model's spectral layers "
                                    f"(differences, name → shape: {diff})")
        source = raw[0]
        same_source = source["id"] == 0 and all(
            torch.allclose(source["codes"][k].to(device=v.device, dtype=v.dtype), v, rtol=1e-6, atol=1e-6)
            for k, v in self._source_codes.items())
        if not same_source:
            raise BankFileError(f"{path}: entry 0 is not this model's pretrained code (a bank of other weights?)")
        if len({e["id"] for e in raw}) != len(raw) or next_id <= max(e["id"] for e in raw):
            raise BankFileError(f"{path}: entry ids are not unique or next_id is stale")

    def _entry_from_file(self, e: dict, device: torch.device) -> BankEntry:
        stats = None if e["mean"] is None else DomainStats(e["mean"].double().to(device), e["var"].double().to(device))
        codes = {k: v.to(device=device, dtype=self._source_codes[k].dtype) for k, v in e["codes"].items()}
        return BankEntry(e["id"], stats, codes, _to_device(e["optimizer_state"], device), e["created_at"], e["weight"])


def _to_device(obj, device):
    """Optimizer-state tensors are restored on the model's device (the optimizer moves them as needed)."""
    if isinstance(obj, Tensor):
        return obj.to(device) if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
