"""Forward pre-hooks that collect the diversity loss's per-expert statistics during a forward.

Each probed `FusedSpectralLinear` hands its input tokens and Vh to `moments_fn` (by default
`expert_alignment_moments`, a separate GEMM that stays differentiable in x); a backend that computes
the same moments inside its fused forward can be passed instead. Hooks do nothing unless a
`capture()` block is active and gradients are enabled, so the model behaves normally otherwise.
"""
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..layers import FusedSpectralLinear
from ..ops.expert_stats import ExpertMoments, expert_alignment_moments

MomentsFn = Callable[[Tensor, Tensor], ExpertMoments]


class DiversityProbe:
    def __init__(self, layers: dict[str, FusedSpectralLinear],
                 moments_fn: MomentsFn = expert_alignment_moments) -> None:
        bad = [n for n, m in layers.items() if not isinstance(m, FusedSpectralLinear)]
        if bad:
            raise TypeError(f"DiversityProbe: not FusedSpectralLinear layers: {bad}")
        self.names = list(layers)
        self.moments_fn = moments_fn
        self._active = False
        self._moments: list[ExpertMoments] = []
        self._handles = [m.register_forward_pre_hook(self._hook) for m in layers.values()]

    def _hook(self, module: FusedSpectralLinear, args: tuple) -> None:
        if self._active and torch.is_grad_enabled():
            self._moments.append(self.moments_fn(args[0], module.Vh))

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Collect moments from the forwards run inside the block (earlier ones are dropped)."""
        self._moments = []
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def take(self) -> list[ExpertMoments]:
        """The collected moments, one per probed layer call; the probe lets go of them (and their graph)."""
        moments, self._moments = self._moments, []
        return moments

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
