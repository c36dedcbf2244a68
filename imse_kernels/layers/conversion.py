"""One-call conversion of a model's `nn.Linear` layers to `FusedSpectralLinear` and back."""
import fnmatch
import warnings
from typing import Callable, Iterable, Optional

from torch import nn

from .fused_spectral_linear import FusedSpectralLinear

#: The linear layers of timm `Attention` and `Mlp` blocks (ViT, DeiT, Swin; Mixer's mlp_tokens/mlp_channels).
DEFAULT_PATTERNS = ("*blocks.*.attn.qkv", "*blocks.*.attn.proj", "*blocks.*.mlp*.fc1", "*blocks.*.mlp*.fc2")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


FilterFn = Callable[[nn.Module, str], bool]
_REQUIRES_GRAD = "_imse_requires_grad"  # model attribute: {parameter name: requires_grad before spectralize}


def spectralize(model: nn.Module, filter_fn: Optional[FilterFn] = None, *,
                include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
                freeze: bool = True, rank: Optional[int] = None, tol: Optional[float] = None) -> list[str]:
    """Replace, in place, the `nn.Linear` layers chosen by `filter_fn(module, fqn)` (as in torchao's
    `quantize_`) and/or by `include` fnmatch patterns on the qualified name, minus any `exclude` match.
    With neither `filter_fn` nor `include`, `DEFAULT_PATTERNS` (the timm attention and MLP linears)
    choose. `freeze=True` freezes every other parameter, so only the converted layers' `s` train.

    Returns the converted names; `unspectralize` undoes the conversion and the freezing.
    """
    if filter_fn is not None and not callable(filter_fn):  # the old positional `include`
        warnings.warn("spectralize(model, include) is deprecated; pass include=... by keyword "
                      "(the second positional argument is filter_fn)", DeprecationWarning, stacklevel=2)
        filter_fn, include = None, filter_fn
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("spectralize: include and exclude take a list of fnmatch patterns, not one string")
    if include is None and filter_fn is None:
        include = DEFAULT_PATTERNS
    include, exclude = (None if include is None else tuple(include)), tuple(exclude or ())
    targets = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and (include is None or _matches(name, include)) and not _matches(name, exclude)
        and (filter_fn is None or filter_fn(m, name))
    ]
    if not hasattr(model, _REQUIRES_GRAD):
        object.__setattr__(model, _REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})
    if freeze:
        model.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, FusedSpectralLinear.from_linear(model.get_submodule(name), rank=rank, tol=tol))
    if not targets:
        warnings.warn(f"spectralize: no nn.Linear matched include={include}, exclude={exclude}"
                      + (", filter_fn" if filter_fn is not None else ""), stacklevel=2)
    return targets


def unspectralize(model: nn.Module) -> list[str]:
    """Merge every `FusedSpectralLinear` back into an `nn.Linear` in place and give every parameter
    the `requires_grad` it had before `spectralize`; returns the merged names."""
    targets = [name for name, m in model.named_modules() if isinstance(m, FusedSpectralLinear)]
    for name in targets:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    before = model.__dict__.pop(_REQUIRES_GRAD, None)
    if before is not None:
        for n, p in model.named_parameters():
            if n in before:
                p.requires_grad_(before[n])
    return targets


def spectral_layers(model: nn.Module) -> dict[str, FusedSpectralLinear]:
    """The model's spectral layers by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedSpectralLinear)}
