"""Cache of the recomposed weight W' = (U ⊙ s)·Vh, valid while s, U and Vh are unchanged.

Validity is tracked by each tensor's identity (storage pointer) and version counter, which every
in-place update (optimizer steps, `load_state_dict`, `copy_`) bumps.
"""
from typing import Optional

import torch
from torch import Tensor

from ..backends import resolve_backend


def _key(U: Tensor, s: Tensor, Vh: Tensor) -> tuple:
    return (
        U.data_ptr(), U._version, U.dtype, tuple(U.shape),
        s.data_ptr(), s._version,
        Vh.data_ptr(), Vh._version, Vh.dtype, tuple(Vh.shape),
        U.device, torch.is_inference_mode_enabled(),
    )


class RecomposedWeightCache:
    """Holds one W' (d_out × d_in, in U's dtype); recomputes it when its inputs change."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._weight: Optional[Tensor] = None
        self.misses = 0

    def lookup(self, U: Tensor, s: Tensor, Vh: Tensor) -> Optional[Tensor]:
        """The cached W' if it is the one of exactly these factors (same tensors, unmodified), else None."""
        return self._weight if self._key is not None and _key(U, s, Vh) == self._key else None

    def get(self, U: Tensor, s: Tensor, Vh: Tensor) -> Tensor:
        key = _key(U, s, Vh)
        if key != self._key:
            with torch.no_grad():
                self._weight = resolve_backend(U.device).recompose(U.detach(), s.detach(), Vh.detach())
            self._key = key
            self.misses += 1
        return self._weight

    def clear(self) -> None:
        self._key, self._weight = None, None
