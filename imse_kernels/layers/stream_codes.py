"""`stream_codes(model, index)`: run a model whose spectral layers hold code tables, sample by sample.

A `FusedSpectralLinear` with `enable_codes(K)` holds a (K, r) table of codes beside its shared `s`.
Inside `with stream_codes(model, index): model(x)`, each of the model's coded layers gives sample b
the code `index[b]` (docs/design.md §8); layers without a table, and every call outside the block,
use `s` exactly as before. The index is checked once at entry, not in every layer. The scope is a
context variable: other threads and tasks, and other models, are unaffected.
"""
import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from .fused_spectral_linear import FusedSpectralLinear, active_codes

__all__ = ["stream_codes", "coded_layers"]


def coded_layers(model: nn.Module) -> dict[str, FusedSpectralLinear]:
    """The model's spectral layers that hold a code table, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedSpectralLinear) and m.codes is not None}


@contextlib.contextmanager
def stream_codes(model: nn.Module, index: Tensor) -> Iterator[None]:
    """Select code `index[b]` for sample b in every coded layer of `model` inside the block.

    `index` is int64 of shape (B,) (one code per sample, shared by its tokens) or the layers' row
    shape; its values must be below every coded layer's K."""
    layers = coded_layers(model)
    if not layers:
        raise ValueError("stream_codes: no spectral layer of this model holds a code table; "
                         "call layer.enable_codes(K) on the layers that should adapt per stream")
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.dim() == 0:
        got = f"{index.dtype} of shape {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"stream_codes: index must be a 1-D (or more) int64 tensor, got {got}")
    k = min(m.codes.shape[0] for m in layers.values())
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= k:
            raise IndexError(f"stream_codes: index values must be in [0, K={k}), got min {lo}, max {hi}")
    with active_codes.set((frozenset(id(m) for m in layers.values()), index)):
        yield
