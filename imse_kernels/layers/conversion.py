"""One-call conversion of a model's `nn.Linear` layers to `FusedSpectralLinear` and back."""
import fnmatch
import warnings
from typing import Iterable, Optional

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


def spectralize(model: nn.Module, include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
                rank: Optional[int] = None, tol: Optional[float] = None) -> list[str]:
    """Replace, in place, the `nn.Linear` layers whose qualified names match `include` (fnmatch
    patterns, default `DEFAULT_PATTERNS`) and no `exclude` pattern; freeze every other parameter.

    Returns the converted names. Only the singular values `s` of converted layers stay trainable.
    """
    include = tuple(DEFAULT_PATTERNS if include is None else include)
    exclude = tuple(exclude or ())
    targets = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and _matches(name, include) and not _matches(name, exclude)
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, FusedSpectralLinear.from_linear(model.get_submodule(name), rank=rank, tol=tol))
    if not targets:
        warnings.warn(f"spectralize: no nn.Linear matched {include}", stacklevel=2)
    return targets


def unspectralize(model: nn.Module) -> list[str]:
    """Merge every `FusedSpectralLinear` back into an `nn.Linear` in place; returns their names."""
    targets = [name for name, m in model.named_modules() if isinstance(m, FusedSpectralLinear)]
    for name in targets:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    return targets


def spectral_layers(model: nn.Module) -> dict[str, FusedSpectralLinear]:
    """The model's spectral layers by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedSpectralLinear)}
