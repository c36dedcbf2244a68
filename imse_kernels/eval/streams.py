"""Test streams: the settings as an ordered list of segments, each a (corruption, severity) domain.

continual, reset_each_shift, gradual and recurring read each segment in order; correlated, mixed_domains and
mixed_correlated carry an explicit schedule of (segment, image) pairs per batch, fixed by the seed, every image
exactly once (docs/design.md, section 11, "Settings").
"""
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

SETTINGS = ("continual", "reset_each_shift", "gradual", "recurring", "correlated", "mixed_domains",
            "mixed_correlated")
#: setting -> one line for `--help`.
SETTING_HELP = {
    "continual": "the corruptions one after another, each domain once, the adapter never reset",
    "reset_each_shift": "the continual stream, the adapter reset at every domain boundary (oracle)",
    "gradual": "per corruption severity 1 -> max -> 1, one level at a time (CoTTA's gradual setting)",
    "recurring": "the continual sequence repeated --rounds times",
    "correlated": "the continual order, labels in temporally correlated runs inside each domain "
                  "(each class spread over time slots in Dirichlet(--dirichlet) proportions, as RoTTA)",
    "mixed_domains": "all domains' images shuffled into one stream, batches mix domains (no boundaries)",
    "mixed_correlated": "all domains mixed into one stream, labels in correlated runs (Dirichlet)",
}
#: Settings whose schedule is built here (image by image), not read segment by segment.
SCHEDULED = ("correlated", "mixed_domains", "mixed_correlated")
#: Settings whose batches mix domains: no domain boundaries in them.
MIXED = ("mixed_domains", "mixed_correlated")
#: The settings that sample labels by a Dirichlet distribution (--dirichlet).
DIRICHLET_SETTINGS = ("correlated", "mixed_correlated")
DEFAULT_DIRICHLET = 0.1
#: Per scheduled setting, the second word of its generator's seed (fixed: other settings never shift them).
_RNG_TAG = {"correlated": 1, "mixed_domains": 2, "mixed_correlated": 3}

#: A batch of a scheduled stream: (segment index, image index in that segment's domain) per image.
Batch = tuple[tuple[int, int], ...]


class DomainData(Protocol):
    """Labelled images of one (corruption, severity) domain, always in the same order.

    `get(indices)` (images by index) is optional: the runner falls back to one-image `batches`."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, start: int = 0,
                count: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class Segment:
    """A stretch of the stream: images [start, start + count) of one domain (count -1: all)."""

    corruption: str
    severity: int
    round: int = 0
    start: int = 0
    count: int = -1

    @property
    def domain(self) -> str:
        return f"{self.corruption}@{self.severity}"

    def label(self, setting: str) -> str:
        if setting == "recurring":
            return f"r{self.round + 1}:{self.corruption}"
        if setting == "gradual":
            return f"{self.corruption}@{self.severity}"
        return self.corruption


@dataclass(frozen=True)
class Stream:
    setting: str
    segments: tuple[Segment, ...]
    #: scheduled settings: the batches, each ((segment, image index), ...); None: read segment by segment
    schedule: Optional[tuple[Batch, ...]] = None
    dirichlet: Optional[float] = None

    @property
    def resets_at_boundaries(self) -> bool:
        return self.setting == "reset_each_shift"

    @property
    def mixes_domains(self) -> bool:
        """Batches hold images of several domains: there are no domain boundaries."""
        return self.setting in MIXED

    def fingerprint(self) -> Optional[str]:
        """SHA-256 of the schedule (None without one): equal fingerprints, the same images in the same order."""
        if self.schedule is None:
            return None
        import hashlib

        h = hashlib.sha256()
        for b in self.schedule:
            h.update(np.asarray(b, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()


def dirichlet_order(labels: Sequence[int], gamma: float, rng: np.random.Generator,
                    slots: Optional[int] = None) -> np.ndarray:
    """A permutation of range(len(labels)) whose labels come in temporally correlated runs.

    As RoTTA's `LabelDirichletDomainSequence` (and the non-i.i.d. streams of the test-time-adaptation
    frameworks): the stream is cut into `slots` time slots (default: one per class, at most 100); every
    class's images (shuffled) are spread over the slots in proportions drawn from Dirichlet(gamma, ...,
    gamma); inside a slot the classes come one after another in a random order. Small gamma: each class
    sits in few slots, long single-class runs; large gamma: every class in every slot, runs of about
    (images per class) / slots, so i.i.d. only where that is about 1 (large data sets, many classes).
    """
    if not gamma > 0:
        raise ValueError(f"--dirichlet must be > 0, got {gamma}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n_slots = slots or min(len(classes), 100)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_slots)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(n_slots, float(gamma)))
        share = np.nan_to_num(share, nan=0.0)
        if share.sum() <= 0:  # tiny gamma can underflow every share: all in one slot
            share = np.eye(n_slots)[rng.integers(n_slots)]
        cuts = (np.cumsum(share / share.sum())[:-1] * len(idx)).astype(int)
        for s, chunk in enumerate(np.split(idx, cuts)):
            parts[s].append(chunk)
    order = [parts[s][i] for s in range(n_slots) for i in rng.permutation(len(parts[s]))]
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


def _chunk(items: Sequence[tuple[int, int]], batch_size: int) -> list[Batch]:
    return [tuple(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def build_stream(setting: str, corruptions: Sequence[str], severity: int, rounds: int = 3,
                 domain_size: int = 0, batch_size: int = 64, labels: Optional[Sequence[int]] = None,
                 dirichlet: float = DEFAULT_DIRICHLET, seed: int = 0) -> Stream:
    """The segment list of a setting. `domain_size` (images per domain) sizes the gradual slices and the
    schedules; `labels` (of a domain's images, the same in every domain) drive the correlated settings;
    `seed` fixes the schedules (the same seed, the same stream)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    if not corruptions:
        raise ValueError("the stream needs at least one corruption")
    if setting in SCHEDULED:
        return _scheduled(setting, corruptions, severity, domain_size, batch_size, labels, dirichlet, seed)
    if setting in ("continual", "reset_each_shift"):
        segs = [Segment(c, severity) for c in corruptions]
    elif setting == "recurring":
        if rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {rounds}")
        segs = [Segment(c, severity, r) for r in range(rounds) for c in corruptions]
    else:
        levels = list(range(1, severity + 1)) + list(range(severity - 1, 0, -1))
        if domain_size <= 0:
            raise ValueError("the gradual setting needs the domain size")
        n_batches = max(1, -(-domain_size // batch_size))
        per_level = batch_size * max(1, round(n_batches / len(levels)))
        segs = []
        for c in corruptions:
            for i, s in enumerate(levels):
                start = (i * per_level) % domain_size
                segs.append(Segment(c, s, 0, start, min(per_level, domain_size)))
    return Stream(setting, tuple(segs))


def _scheduled(setting, corruptions, severity, domain_size, batch_size, labels, dirichlet, seed) -> Stream:
    if domain_size <= 0:
        raise ValueError(f"the {setting} setting needs the domain size")
    if batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    correlated = setting in DIRICHLET_SETTINGS
    if correlated:
        if labels is None or len(labels) != domain_size:
            raise ValueError(f"the {setting} setting needs the labels of the domain's {domain_size} images")
        labels = np.asarray(labels)
    segs = tuple(Segment(c, severity) for c in corruptions)
    rng = np.random.default_rng([int(seed) % 2 ** 64, _RNG_TAG[setting]])
    batches: list[Batch] = []
    if setting == "correlated":  # continual domain order; batches never straddle a boundary
        for s in range(len(segs)):
            order = dirichlet_order(labels, dirichlet, rng)
            batches += _chunk([(s, int(i)) for i in order], batch_size)
    else:
        pool = [(s, i) for s in range(len(segs)) for i in range(domain_size)]
        if setting == "mixed_domains":
            order = rng.permutation(len(pool))
        else:  # the pooled images' labels drive the runs; domains fall at random inside them
            order = dirichlet_order(np.tile(labels, len(segs)), dirichlet, rng)
        batches = _chunk([pool[int(k)] for k in order], batch_size)
    return Stream(setting, segs, tuple(batches), float(dirichlet) if correlated else None)


def segment_batches(stream: Stream, sizes: Optional[Sequence[int]] = None, batch_size: int = 0) -> list[int]:
    """Per segment, the batches holding any of its images (for segment lists: ceil(size / batch_size))."""
    if stream.schedule is None:
        if sizes is None:
            raise ValueError("a segment list needs the segment sizes")
        return [-(-n // batch_size) for n in sizes]
    counts = [0] * len(stream.segments)
    for b in stream.schedule:
        for s in {s for s, _ in b}:
            counts[s] += 1
    return counts


def true_boundaries(segment_batches: Sequence[int], segments: Sequence[Segment]) -> list[int]:
    """Global batch indices where the domain changes (the start of the stream is not one: IMSE's tracker has
    no running statistics before its first window, so a shift away from the source cannot be declared there).

    Only for streams whose segments follow one another (every setting but the mixed ones)."""
    out, pos = [], 0
    for i, (seg, n) in enumerate(zip(segments, segment_batches)):
        if i > 0 and seg.domain != segments[i - 1].domain:
            out.append(pos)
        pos += n
    return out


def label_runs(labels: Sequence[int]) -> list[int]:
    """Lengths of the runs of equal consecutive labels (a measure of temporal correlation)."""
    runs, prev = [], object()
    for y in labels:
        if runs and y == prev:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = y
    return runs
