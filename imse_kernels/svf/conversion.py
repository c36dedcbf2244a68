"""Whole-model SVF: convert a Hugging Face causal LM's layers to `SVFLinear`, move z vectors and experts
in and out, and merge back to plain weights (docs/design.md, section 15)."""
import os
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ..layers.conversion import preset_patterns, remember_requires_grad, restore_requires_grad, select_layers
from .decomposition import decompose, load_decomposition, save_decomposition
from .parametrization import SVFConfig
from .svf_linear import SVFLinear


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def svf_layers(model: nn.Module) -> dict[str, SVFLinear]:
    """The model's SVF layers by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVFLinear)}


def to_svf(model: nn.Module, preset: Optional[str] = "auto", parts: Iterable[str] = ("mlp",), *,
           include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
           filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
           decomposition: "os.PathLike | str | None" = None, svd_dtype: torch.dtype = torch.float32,
           freeze: bool = True, mask: str = "sigmoid", rescale: bool = True, max_mult: float = 1.0,
           z_init: Optional[float] = None) -> list[str]:
    """Replace, in place, the chosen nn.Linear / Conv1D layers by `SVFLinear`s; returns their names.

    Layers: the `parts` ("mlp", as Transformer² adapts, and/or "attn") of `preset` ("llama", "mistral",
    "qwen2", "gpt2", or "auto" from `model.config.model_type`; None for none), plus `include` patterns
    and/or `filter_fn(module, name)`, minus `exclude`. `decomposition`: a path; an existing file is
    loaded (and checked against the weights), a missing one is computed and saved there, so the SVD runs
    once per checkpoint. `freeze=True` leaves only the z vectors trainable. The model starts exactly
    where it was (z constant, rescale on; or a plain scale of 1).
    """
    config = SVFConfig(mask, rescale, max_mult)
    patterns = tuple(include or ()) + (preset_patterns(model, preset, parts) if preset is not None else ())
    if not patterns and filter_fn is None:
        raise ValueError("to_svf: choose layers with preset=, include= or filter_fn=")
    names = select_layers(model, filter_fn, include=patterns or None, exclude=exclude)
    if not names:
        warnings.warn(f"to_svf: no nn.Linear or Conv1D matched {patterns}", stacklevel=2)
        return names
    if decomposition is not None and os.path.exists(decomposition):
        factors = load_decomposition(decomposition, model, names)
    else:
        factors = decompose(model, names, svd_dtype)
        if decomposition is not None:
            save_decomposition(decomposition, model, factors)
    remember_requires_grad(model)
    if freeze:
        model.requires_grad_(False)
    for name in names:
        layer = SVFLinear.from_module(model.get_submodule(name), factors[name], config=config, z_init=z_init)
        _set_submodule(model, name, layer)
    return names


def merge(model: nn.Module, alpha: Optional[Tensor] = None) -> list[str]:
    """Replace every `SVFLinear` by a plain nn.Linear (Conv1D where it replaced one) with weight
    U·diag(s)·Vh, s from the layer's z, or with `alpha` (K,) from the mixture α·Z of its experts;
    restores every parameter's requires_grad from before `to_svf`. Returns the merged names."""
    layers = svf_layers(model)
    for name, layer in layers.items():
        s = None
        if alpha is not None:
            if layer.experts is None or alpha.dim() != 1 or alpha.shape[0] != layer.experts.shape[0]:
                k = None if layer.experts is None else layer.experts.shape[0]
                raise ValueError(f"merge: alpha must be (K,) for the K={k} experts of {name!r}, "
                                 f"got shape {tuple(alpha.shape)}")
            s = layer.scale(alpha.to(layer.experts.dtype) @ layer.experts.detach())
        _set_submodule(model, name, layer.to_module(s))
    restore_requires_grad(model)
    return list(layers)


def z_state(model: nn.Module) -> dict[str, Tensor]:
    """name → a copy of each SVF layer's z: one trained expert."""
    return {n: m.z.detach().clone() for n, m in svf_layers(model).items()}


def load_z_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a `z_state` into the model's SVF layers (the same names and ranks)."""
    layers = svf_layers(model)
    if set(state) != set(layers):
        raise ValueError(f"load_z_state: the state has layers {sorted(set(state) - set(layers))[:4]} the model "
                         f"lacks and lacks {sorted(set(layers) - set(state))[:4]}")
    with torch.no_grad():
        for n, m in layers.items():
            if state[n].shape != m.z.shape:
                raise ValueError(f"load_z_state: {n!r} has z of shape {tuple(m.z.shape)}, the state "
                                 f"{tuple(state[n].shape)}")
            m.z.copy_(state[n])


def set_experts(model: nn.Module, states: list[dict[str, Tensor]], trainable: bool = False) -> None:
    """Give every SVF layer the K experts Z (K × r) stacked from K `z_state`s (for `mix_experts`)."""
    layers = svf_layers(model)
    if not states:
        raise ValueError("set_experts: give at least one z_state")
    for i, state in enumerate(states):
        if set(state) != set(layers):
            missing, extra = sorted(set(layers) - set(state))[:4], sorted(set(state) - set(layers))[:4]
            raise ValueError(f"set_experts: state {i} does not name exactly the model's SVF layers "
                             f"(missing {missing}, extra {extra})")
    for n, m in layers.items():
        for i, state in enumerate(states):
            if tuple(state[n].shape) != (m.rank,):
                raise ValueError(f"set_experts: state {i} gives {n!r} a z of shape {tuple(state[n].shape)}, "
                                 f"expected ({m.rank},)")
        m.set_experts(torch.stack([state[n].to(m.S.device, m.S.dtype) for state in states]), trainable)
