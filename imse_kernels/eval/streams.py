"""Test streams: the four settings as an ordered list of segments, each a (corruption, severity) domain.

continual          every corruption once, in order, the adapter never reset;
reset_each_shift   the same stream, the adapter reset at every domain boundary (an oracle that knows them);
gradual            per corruption, severity 1 -> max -> 1 one level at a time (CoTTA's gradual setting);
                   each level is a slice of the domain's images, at least one batch;
recurring          the continual sequence repeated `rounds` times.
"""
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

SETTINGS = ("continual", "reset_each_shift", "gradual", "recurring")


class DomainData(Protocol):
    """Labelled images of one (corruption, severity) domain, always in the same order."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, start: int = 0, count: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


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

    @property
    def resets_at_boundaries(self) -> bool:
        return self.setting == "reset_each_shift"


def build_stream(setting: str, corruptions: Sequence[str], severity: int, rounds: int = 3,
                 domain_size: int = 0, batch_size: int = 64) -> Stream:
    """The segment list of a setting. `domain_size` (images per domain) sizes the gradual slices."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    if not corruptions:
        raise ValueError("the stream needs at least one corruption")
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


def true_boundaries(segment_batches: Sequence[int], segments: Sequence[Segment]) -> list[int]:
    """Global batch indices where the domain changes (the start of the stream is not one: IMSE's tracker has
    no running statistics before its first window, so a shift away from the source cannot be declared there)."""
    out, pos = [], 0
    for i, (seg, n) in enumerate(zip(segments, segment_batches)):
        if i > 0 and seg.domain != segments[i - 1].domain:
            out.append(pos)
        pos += n
    return out
