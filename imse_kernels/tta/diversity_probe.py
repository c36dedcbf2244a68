"""Taps that collect the diversity loss's per-expert statistics during a forward (docs/design.md, section 6).

Inside `capture()` each probed `FusedSpectralLinear` hands its input rows (and h = x·Vhᵀ where its forward
computes h anyway) to `moments_fn`; the taps are built once, so a compiled forward's guards hold.
"""
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Optional

from torch import Tensor

from ..layers import FusedSpectralLinear
from ..losses import ExpertMoments, expert_alignment_moments

MomentsFn = Callable[..., ExpertMoments]  # moments_fn(x_rows, Vh, h=None)


class DiversityProbe:
    def __init__(self, layers: dict[str, FusedSpectralLinear],
                 moments_fn: MomentsFn = expert_alignment_moments) -> None:
        bad = [n for n, m in layers.items() if not isinstance(m, FusedSpectralLinear)]
        if bad:
            raise TypeError(f"DiversityProbe: not FusedSpectralLinear layers: {bad}")
        self.names = list(layers)
        self.layers = list(layers.values())
        self.moments_fn = moments_fn
        self._moments: list[ExpertMoments] = []
        self._taps = [partial(self._tap, m) for m in self.layers]  # stable objects (compile guards)

    def _tap(self, module: FusedSpectralLinear, x: Tensor, h: Optional[Tensor]) -> None:
        self._moments.append(self.moments_fn(x, module.Vh, h=h))

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Collect moments from the forwards run inside the block (earlier ones are dropped)."""
        self._moments = []
        for m, tap in zip(self.layers, self._taps):
            m.factor_tap = tap
        try:
            yield
        finally:
            for m in self.layers:
                m.factor_tap = None

    def take(self) -> list[ExpertMoments]:
        """The collected moments, one per probed layer call; the probe lets go of them (and their graph)."""
        moments, self._moments = self._moments, []
        return moments

    def remove(self) -> None:
        """Detach from the layers (a capture block in progress ends its taps on exit as usual)."""
        for m in self.layers:
            m.factor_tap = None
        self.layers = []
        self._taps = []
