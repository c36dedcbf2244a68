"""Per-sample mixing of K SVF experts (docs/design.md, section 15).

Inside `with mix_experts(model, alpha): model(x)` sample b gets the code α_b · Z through the op's per-sample
path, in training and batched inference, with no loop over experts; `mask="layer"` (default) or "identity"
(Transformer²'s `WeightedCombination`).
"""
import contextlib
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..overrides import Override

_scope = Override("svf_mix_experts")


class _Mixture(NamedTuple):
    layers: frozenset   # ids of the layers that mix
    alpha: Tensor       # (B, K)
    index: Tensor       # arange(B): one code per sample
    own_mask: bool


def active_mixture(layer: nn.Module) -> Optional[tuple[Tensor, Tensor, bool]]:
    """(alpha, index, own_mask) when `layer` is inside a `mix_experts` block of its model, else None."""
    scope = _scope.get()
    if scope is None or id(layer) not in scope.layers:
        return None
    return scope.alpha, scope.index, scope.own_mask


def expert_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's SVF layers that hold experts, by qualified name."""
    return {n: m for n, m in model.named_modules() if getattr(m, "experts", None) is not None and hasattr(m, "z")}


@contextlib.contextmanager
def mix_experts(model: nn.Module, alpha: Tensor, mask: str = "layer") -> Iterator[None]:
    """Inside the block, sample b of every forward of `model` uses the mixture α_b · Z in every SVF
    layer that holds experts. `alpha` is (B, K), floating point, on the layers' device; it may require
    grad. Transformer² normalises its coefficients to sum to one; pass `alpha / alpha.sum(-1, True)`
    for that."""
    if mask not in ("layer", "identity"):
        raise ValueError(f"mix_experts: mask must be 'layer' or 'identity', got {mask!r}")
    layers = expert_layers(model)
    if not layers:
        raise ValueError("mix_experts: no SVF layer of this model holds experts; call "
                         "imse_kernels.svf.set_experts(model, [z_state, ...]) first")
    if not isinstance(alpha, Tensor) or not alpha.is_floating_point() or alpha.dim() != 2:
        got = f"{alpha.dtype} of shape {tuple(alpha.shape)}" if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"mix_experts: alpha must be a floating-point (B, K) tensor of mixing weights, got {got}")
    ks = {m.experts.shape[0] for m in layers.values()}
    if ks != {alpha.shape[1]}:
        raise ValueError(f"mix_experts: alpha has K={alpha.shape[1]} columns but the layers hold {sorted(ks)} "
                         "experts; give one column per expert")
    if alpha.shape[0] == 0:
        raise ValueError("mix_experts: alpha has no rows; give one row of mixing weights per sample")
    device = next(iter(layers.values())).U.device
    if alpha.device != device:
        raise ValueError(f"mix_experts: alpha is on {alpha.device} but the layers are on {device}")
    index = torch.arange(alpha.shape[0], device=device)
    with _scope.set(_Mixture(frozenset(id(m) for m in layers.values()), alpha, index, mask == "layer")):
        yield
