"""Per-layer cache of tensors derived from the frozen factors: W' = (U ⊙ s)·Vh, and the factors in the
autocast dtype (docs/design.md, sections 2 and 14).

- W' in the layer dtype: `weight`, and the frozen-s path outside autocast.
- Under autocast (e.g. bf16 on the CPU): U, Vh and a frozen bias cast once to the compute dtype, and
  W' in the compute dtype (recomposed in the layer dtype, then rounded once), so nothing is cast on
  every call. `s` itself is never cast: it stays float32 and is applied in float32 inside the kernels.

Validity is tracked by each source tensor's identity (storage pointer), version counter, dtype and
shape, so every in-place update (optimizer steps, `load_state_dict`, `copy_`) and every `.to(...)`
invalidates what was derived from it; a stale entry is rebuilt under `no_grad` on the next use.
"""
from typing import Optional

import torch
from torch import Tensor

from ..backends import resolve_backend


def _tensor_key(t: Optional[Tensor]) -> tuple:
    if t is None:
        return (None,)
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device)


def _weight_key(U: Tensor, s: Tensor, Vh: Tensor) -> tuple:
    return (*_tensor_key(U), *_tensor_key(s), *_tensor_key(Vh), torch.is_inference_mode_enabled())


class RecomposedWeightCache:
    """W' per dtype (one entry per dtype) and the frozen factors and bias cast to a compute dtype.

    `misses` counts W' rebuilds, `cast_misses` rebuilds of a cast factor or bias."""

    def __init__(self) -> None:
        self._weights: dict[torch.dtype, tuple[tuple, Tensor]] = {}
        self._casts: dict[tuple[str, torch.dtype], tuple[tuple, Tensor]] = {}
        self.misses = 0
        self.cast_misses = 0

    def lookup(self, U: Tensor, s: Tensor, Vh: Tensor, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
        """The cached W' in `dtype` (default U's) if it is the one of exactly these factors, else None."""
        entry = self._weights.get(dtype or U.dtype)
        return entry[1] if entry is not None and entry[0] == _weight_key(U, s, Vh) else None

    def get(self, U: Tensor, s: Tensor, Vh: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """W' = (U ⊙ s)·Vh in `dtype` (default U's), without gradient; rebuilt when U, s or Vh changed.

        A W' in another dtype than U's is recomposed in U's dtype and rounded once."""
        dtype = dtype or U.dtype
        key = _weight_key(U, s, Vh)
        entry = self._weights.get(dtype)
        if entry is None or entry[0] != key:
            # autocast off: the kernels' own GEMMs would otherwise run in the autocast dtype
            with torch.no_grad(), torch.autocast(U.device.type, enabled=False):
                W = resolve_backend(U.device).recompose(U.detach(), s.detach(), Vh.detach())
                W = W.to(dtype).contiguous()
            self._weights[dtype] = entry = (key, W)
            self.misses += 1
        return entry[1]

    def cast(self, name: str, t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
        """`t` (a frozen factor or bias, stored under `name`) in `dtype`, contiguous, rebuilt when `t`
        changed. A tensor that requires grad is cast on every call (its gradient flows through the cast)."""
        if t is None or t.dtype == dtype:
            return t
        if t.requires_grad:
            return t.to(dtype)
        key = (*_tensor_key(t), torch.is_inference_mode_enabled())
        entry = self._casts.get((name, dtype))
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, t.detach().to(dtype).contiguous())
            self._casts[(name, dtype)] = entry
            self.cast_misses += 1
        return entry[1]

    def factors(self, U: Tensor, Vh: Tensor, bias: Optional[Tensor],
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(U, Vh, bias) in `dtype` through `cast`."""
        return self.cast("U", U, dtype), self.cast("Vh", Vh, dtype), self.cast("bias", bias, dtype)

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (persistent like weights: benchmarks leave them out of activations)."""
        return [w for _, w in self._weights.values()] + [t for _, t in self._casts.values()]

    def clear(self) -> None:
        self._weights.clear()
        self._casts.clear()
