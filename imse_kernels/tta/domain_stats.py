"""Domain statistics for IMSE's code bank (docs/design.md, section 7).

A domain is described by the per-channel mean and variance of the patch-embedding tokens; `DISTANCE_FNS`
compares two (official domain_info.py `_calculate_domain_shift`). `DomainTracker` keeps the running descriptor,
declares shifts, and describes partial or small batches (`partial_batch`: official, pool or auto).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .config import PARTIAL_BATCH, canonical_distance


@dataclass(frozen=True)
class DomainStats:
    """Per-channel mean and unbiased variance of a domain's patch tokens (float64, shape (C,))."""
    mean: Tensor
    var: Tensor


def symmetric_kl(a: DomainStats, b: DomainStats) -> float:
    """KL(a‖b) + KL(b‖a) for diagonal Gaussians, averaged over channels (the log terms cancel)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"symmetric_kl: descriptors have {a.mean.shape[0]} and {b.mean.shape[0]} channels")
    d2 = (a.mean - b.mean.to(a.mean.device)) ** 2
    va, vb = a.var, b.var.to(a.var.device)
    return float(((va + d2) / (2 * vb) + (vb + d2) / (2 * va) - 1).mean())


def mean_distance(a: DomainStats, b: DomainStats) -> float:
    """mean_c (μa − μb)²  (official `distance='mean'`)."""
    _same_channels(a, b, "mean_distance")
    return float(((a.mean - b.mean.to(a.mean.device)) ** 2).mean())


def variance_distance(a: DomainStats, b: DomainStats) -> float:
    """mean_c (σa² − σb²)², on the variances  (official `distance='variance'`)."""
    _same_channels(a, b, "variance_distance")
    return float(((a.var - b.var.to(a.var.device)) ** 2).mean())


def l2_distance(a: DomainStats, b: DomainStats) -> float:
    """mean_c [(σa² − σb²)² + (μa − μb)²]  (official `distance='l2_distance'`)."""
    _same_channels(a, b, "l2_distance")
    return float(((a.var - b.var.to(a.var.device)) ** 2 + (a.mean - b.mean.to(a.mean.device)) ** 2).mean())


def _same_channels(a: DomainStats, b: DomainStats, who: str) -> None:
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"{who}: descriptors have {a.mean.shape[0]} and {b.mean.shape[0]} channels")


#: name → distance(a, b) -> float; the names are `config.DISTANCES`.
DISTANCE_FNS: dict[str, Callable[[DomainStats, DomainStats], float]] = {
    "skl": symmetric_kl, "mean": mean_distance, "variance": variance_distance, "l2": l2_distance}


def domain_distance(a: DomainStats, b: DomainStats, name: str = "skl") -> float:
    """The distance `name` (one of `config.DISTANCES`, or an alias) between two descriptors."""
    return DISTANCE_FNS[canonical_distance(name, "domain_distance: name")](a, b)


def stats_state(stats: Optional[DomainStats]) -> Optional[dict]:
    """A descriptor as {"mean", "var"} (None stays None), for state dicts."""
    return None if stats is None else {"mean": stats.mean, "var": stats.var}


def stats_from_state(state: Optional[dict], device=None) -> Optional[DomainStats]:
    """Inverse of `stats_state` (float64, on `device`); raises ValueError on a malformed descriptor."""
    if state is None:
        return None
    mean, var = state["mean"], state["var"]
    if not (isinstance(mean, Tensor) and isinstance(var, Tensor) and mean.dim() == 1 and mean.shape == var.shape):
        raise ValueError("malformed domain descriptor in the state (mean and var must be 1-D, same shape)")
    return DomainStats(mean.to(device=device, dtype=torch.float64), var.to(device=device, dtype=torch.float64))


def ema(old: DomainStats, new: DomainStats, momentum: float) -> DomainStats:
    """momentum · old + (1 − momentum) · new, channel-wise (the official update)."""
    return DomainStats(momentum * old.mean + (1 - momentum) * new.mean.to(old.mean.device),
                       momentum * old.var + (1 - momentum) * new.var.to(old.var.device))


@torch.no_grad()
def patch_embedding_tokens(model: nn.Module, x: Tensor) -> Tensor:
    """(B, T, C) patch tokens of a timm ViT-style model: patch_embed → _pos_embed → norm_pre, prefix dropped."""
    for attr in ("patch_embed", "_pos_embed", "norm_pre"):
        if not hasattr(model, attr):
            raise TypeError(f"patch_embedding_tokens: {type(model).__name__} has no `{attr}`; the code bank needs "
                            "a timm VisionTransformer-like model (patch_embed, _pos_embed, norm_pre)")
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    return tokens[:, getattr(model, "num_prefix_tokens", 1):]


def image_moments(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: token count (B,), mean (B, C) and sum of squared deviations M2 (B, C), all float64."""
    if tokens.dim() != 3 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"expected patch tokens (B, T, C) with B, T >= 1, got shape {tuple(tokens.shape)}")
    t = tokens.detach().float()
    mean = t.mean(1)
    m2 = ((t - mean.unsqueeze(1)) ** 2).sum(1)
    count = torch.full((t.shape[0],), float(t.shape[1]), dtype=torch.float64, device=t.device)
    return count, mean.double(), m2.double()


def pooled_stats(count: Tensor, mean: Tensor, m2: Tensor) -> DomainStats:
    """Combine per-image moments exactly (Chan et al.) into the stats of all their tokens together."""
    n = count.sum()
    if float(n) < 2:
        raise ValueError("domain statistics need at least 2 tokens")
    w = count.unsqueeze(1)
    mu = (w * mean).sum(0) / n
    total_m2 = m2.sum(0) + (w * (mean - mu) ** 2).sum(0)
    return DomainStats(mu, total_m2 / (n - 1))


@dataclass(frozen=True)
class Observation:
    """What one batch told the tracker.

    stats    descriptor of the current batch or window (None while a pooled window holds fewer than
             `window` images).
    kl       the tracker's distance (symmetric KL by default; the name is historical) between the
             running descriptor and `stats` (None when either is missing or detection is off).
    ended    the running descriptor of the domain that just ended, when this batch is a shift.
    partial  the batch was described alone and is smaller than the nominal batch size: it was
             compared with the running descriptor but did not move it (official handling).
    """
    stats: Optional[DomainStats]
    kl: Optional[float]
    ended: Optional[DomainStats]
    partial: bool = False

    @property
    def shift(self) -> bool:
        return self.ended is not None


class DomainTracker:
    """Running descriptor of the current domain, shift detection, and how batches are described.

    DomainTracker(window=64, momentum=0.8, threshold=0.05, *, distance="skl", partial_batch="auto"):
    `distance` is one of `config.DISTANCES` (shift ⇔ distance(running, current) > threshold);
    `partial_batch` "official" | "pool" | "auto" as in the module docstring. The nominal batch size is
    the largest batch observed since `reset()` (a shift keeps it).
    """

    def __init__(self, window: int = 64, momentum: float = 0.8, threshold: float = 0.05, *,
                 distance: str = "skl", partial_batch: str = "auto") -> None:
        if int(window) < 1:
            raise ValueError(f"DomainTracker: window must be >= 1, got {window}")
        if partial_batch not in PARTIAL_BATCH:
            raise ValueError(f"DomainTracker: partial_batch must be one of {PARTIAL_BATCH}, got {partial_batch!r}")
        self.window, self.momentum, self.threshold = int(window), float(momentum), float(threshold)
        self.distance = canonical_distance(distance, "DomainTracker: distance")
        self.partial_batch = partial_batch
        self._distance = DISTANCE_FNS[self.distance]
        self.reset()

    def reset(self) -> None:
        """Forget everything, the nominal batch size included (a new stream starts)."""
        self._restart()
        self.nominal = 0  # largest batch seen since the reset

    def _restart(self) -> None:
        """Forget the running descriptor and the window (a new domain starts); keep the nominal batch size."""
        self.running: Optional[DomainStats] = None
        self._moments: Optional[tuple[Tensor, Tensor, Tensor]] = None  # count, mean, M2 per image
        self._fresh = 0  # images since the running descriptor last moved (pooled windows)

    def alone(self) -> bool:
        """Whether batches are now described alone (official handling) rather than pooled."""
        if self.partial_batch == "auto":
            return self.nominal >= self.window
        return self.partial_batch == "official"

    def state_dict(self) -> dict:
        """Running descriptor, window moments, images since the last EMA move and the nominal batch size
        (tensors by reference)."""
        return {"running": stats_state(self.running), "moments": None if self._moments is None else list(self._moments),
                "fresh": self._fresh, "nominal": self.nominal}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore a `state_dict()` (tensors moved to `device`); checked before anything changes. A state
        written before the nominal batch size was kept has none: it is learned again from the next batches."""
        running = stats_from_state(state["running"], device)
        moments = state["moments"]
        if moments is not None:
            if len(moments) != 3 or moments[1].dim() != 2 or moments[2].shape != moments[1].shape \
                    or moments[0].shape != moments[1].shape[:1]:
                raise ValueError("DomainTracker: malformed window moments in the state")
            moments = tuple(t.to(device=device, dtype=torch.float64) for t in moments)
        counts = {}
        for key in ("fresh", "nominal"):
            v = state.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"DomainTracker: {key!r} is {v!r}, not a count")
            counts[key] = v
        self.running, self._moments = running, moments
        self._fresh, self.nominal = counts["fresh"], counts["nominal"]

    def _check_channels(self, moments: tuple[Tensor, Tensor, Tensor]) -> None:
        known = self._moments[1].shape[1] if self._moments is not None else (
            self.running.mean.shape[0] if self.running is not None else None)
        if known is not None and known != moments[1].shape[1]:
            raise ValueError(f"patch tokens have {moments[1].shape[1]} channels, earlier ones had {known}")

    def _push(self, moments: tuple[Tensor, Tensor, Tensor]) -> None:
        """Append a batch; keep the last max(window, batch) images."""
        batch = moments[0].shape[0]
        self._check_channels(moments)
        if self._moments is not None:
            moments = tuple(torch.cat([old.to(new.device), new]) for old, new in zip(self._moments, moments))
        keep = max(self.window, batch)
        self._moments = tuple(t[-keep:] for t in moments)

    def current(self) -> Optional[DomainStats]:
        """Stats of the pooled window once it holds at least `window` images, else None."""
        if self._moments is None or self._moments[0].shape[0] < self.window:
            return None
        return pooled_stats(*self._moments)

    @torch.no_grad()
    def observe(self, tokens: "Tensor | tuple[Tensor, Tensor, Tensor]", detect: bool = True) -> Observation:
        """Add a batch of patch tokens (B, T, C), or their `image_moments`; detect a shift; move the
        running descriptor. (Data-parallel IMSE passes the moments of every rank's images, in rank order.)

        On a shift the running descriptor and the window restart from this batch alone (a partial
        batch described alone leaves the new running descriptor unset, as the official code). A batch
        with non-finite tokens is ignored.
        """
        moments = tuple(tokens) if isinstance(tokens, (tuple, list)) else image_moments(tokens)
        if not bool(torch.isfinite(moments[1]).all() and torch.isfinite(moments[2]).all()):
            return Observation(None, None, None)  # a non-finite batch must not poison the running stats
        batch = moments[0].shape[0]
        self.nominal = max(self.nominal, batch)
        if self.alone():
            return self._observe_alone(moments, batch, detect)
        self._push(moments)
        self._fresh += batch
        stats, kl, ended = self.current(), None, None
        if detect and stats is not None and self.running is not None:
            kl = self._distance(self.running, stats)
            if kl > self.threshold:
                ended = self.running
                self._restart()
                self._push(moments)
                self._fresh = batch
                stats = self.current()
        if stats is not None and self._fresh >= self.window:
            self.running = stats if self.running is None else ema(self.running, stats, self.momentum)
            self._fresh = 0
        return Observation(stats, kl, ended)

    def _observe_alone(self, moments: tuple[Tensor, Tensor, Tensor], batch: int, detect: bool) -> Observation:
        """The official DomainInfo.forward: the batch's own stats are compared with the running ones; a
        batch of the nominal size then moves them (EMA, or sets them after a shift), a partial one does not."""
        self._check_channels(moments)
        self._moments, self._fresh = moments, 0
        try:
            stats = pooled_stats(*moments)  # reads the token count once, as `current()` does
        except ValueError:  # fewer than 2 tokens: no descriptor
            stats = None
        partial = batch < self.nominal
        kl, ended = None, None
        if detect and stats is not None and self.running is not None:
            kl = self._distance(self.running, stats)
            if kl > self.threshold:
                ended = self.running
                self._restart()
                self._moments = moments
        if stats is not None and not partial:
            self.running = stats if self.running is None else ema(self.running, stats, self.momentum)
        return Observation(stats, kl, ended, partial)

    def summary(self) -> Optional[DomainStats]:
        """The running descriptor, or the stats of the window (or last batch) over however many images it holds."""
        if self.running is not None:
            return self.running
        return None if self._moments is None else pooled_stats(*self._moments)
