"""One-call conversion of a model's `nn.Linear` (and GPT-2 `Conv1D`) layers to `FusedSpectralLinear` and back."""
import fnmatch
import warnings
from typing import Callable, Iterable, Optional

from torch import nn

from .conv1d import conv1d_shell, is_conv1d, linear_view, rebuild_conv1d
from .fused_spectral_linear import FusedSpectralLinear

#: The linear layers of timm `Attention` and `Mlp` blocks (ViT, DeiT, Swin; Mixer's mlp_tokens/mlp_channels).
DEFAULT_PATTERNS = ("*blocks.*.attn.qkv", "*blocks.*.attn.proj", "*blocks.*.mlp*.fc1", "*blocks.*.mlp*.fc2")

_LLAMA_LIKE = {"attn": ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj"),
               "mlp": ("*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj")}
#: fnmatch patterns of the decoder families' linear layers, by `config.model_type` and part ("attn", "mlp").
#: GPT-2's layers are `Conv1D`s (weight stored transposed); they are converted through the transpose.
DECODER_PRESETS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
    "gpt2": {"attn": ("*.attn.c_attn", "*.attn.c_proj"), "mlp": ("*.mlp.c_fc", "*.mlp.c_proj")},
}


def preset_patterns(model: nn.Module, preset: str = "auto", parts: Iterable[str] = ("attn", "mlp")) -> tuple[str, ...]:
    """The patterns of `DECODER_PRESETS[preset]` for `parts`; "auto" reads `model.config.model_type`."""
    if preset == "auto":
        preset = getattr(getattr(model, "config", None), "model_type", None)
        if preset not in DECODER_PRESETS:
            raise ValueError(f"preset='auto': the model's config.model_type is {preset!r}, which has no preset; "
                             f"name one of {sorted(DECODER_PRESETS)} or choose layers with include=/filter_fn=")
    if preset not in DECODER_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(DECODER_PRESETS)} or 'auto'")
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in DECODER_PRESETS[preset]]
    if unknown or not parts:
        raise ValueError(f"preset {preset!r}: parts must be a non-empty subset of "
                         f"{sorted(DECODER_PRESETS[preset])}, got {list(parts)}")
    return tuple(p for part in parts for p in DECODER_PRESETS[preset][part])


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear (exactly) or a Hugging Face Conv1D: what the conversions accept."""
    return type(module) is nn.Linear or is_conv1d(module)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


FilterFn = Callable[[nn.Module, str], bool]
_REQUIRES_GRAD = "_imse_requires_grad"  # model attribute: {parameter name: requires_grad before spectralize}
_CONV1D_SHELLS = "_imse_conv1d_shells"  # model attribute: {name: the Conv1D, without parameters, it replaced}


def spectralize(model: nn.Module, filter_fn: Optional[FilterFn] = None, *,
                include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
                freeze: bool = True, rank: Optional[int] = None, tol: Optional[float] = None,
                preset: Optional[str] = None) -> list[str]:
    """Replace, in place, the `nn.Linear` layers chosen by `filter_fn(module, fqn)` (as in torchao's
    `quantize_`) and/or by `include` fnmatch patterns on the qualified name, minus any `exclude` match.
    With neither `filter_fn` nor `include`, `DEFAULT_PATTERNS` (the timm attention and MLP linears)
    choose. `preset` ("llama", "mistral", "qwen2", "gpt2" or "auto": `DECODER_PRESETS`) adds a decoder
    family's attention and MLP layers to `include`. Hugging Face `Conv1D` layers (GPT-2) are converted
    through their transpose and merged back into `Conv1D`s. `freeze=True` freezes every other
    parameter, so only the converted layers' `s` train.

    Returns the converted names; `unspectralize` undoes the conversion and the freezing.
    """
    if filter_fn is not None and not callable(filter_fn):  # the old positional `include`
        warnings.warn("spectralize(model, include) is deprecated; pass include=... by keyword "
                      "(the second positional argument is filter_fn)", DeprecationWarning, stacklevel=2)
        filter_fn, include = None, filter_fn
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("spectralize: include and exclude take a list of fnmatch patterns, not one string")
    if preset is not None:
        include = tuple(include or ()) + preset_patterns(model, preset)
    if include is None and filter_fn is None:
        include = DEFAULT_PATTERNS
    targets = select_layers(model, filter_fn, include=include, exclude=exclude)
    remember_requires_grad(model)
    if freeze:
        model.requires_grad_(False)
    for name in targets:
        layer = model.get_submodule(name)
        if is_conv1d(layer):
            model.__dict__.setdefault(_CONV1D_SHELLS, {})[name] = conv1d_shell(layer)
            layer = linear_view(layer)
        _set_submodule(model, name, FusedSpectralLinear.from_linear(layer, rank=rank, tol=tol))
    if not targets:
        warnings.warn(f"spectralize: no nn.Linear matched include={include}, exclude={exclude}"
                      + (", filter_fn" if filter_fn is not None else ""), stacklevel=2)
    return targets


def unspectralize(model: nn.Module) -> list[str]:
    """Merge every `FusedSpectralLinear` back into an `nn.Linear` (a `Conv1D` where it replaced one) in
    place and give every parameter the `requires_grad` it had before `spectralize`; returns the merged names."""
    targets = [name for name, m in model.named_modules() if isinstance(m, FusedSpectralLinear)]
    shells = model.__dict__.get(_CONV1D_SHELLS, {})
    for name in targets:
        linear = model.get_submodule(name).to_linear()
        if name in shells:
            grads = (linear.weight.requires_grad, linear.bias is not None and linear.bias.requires_grad)
            linear = rebuild_conv1d(shells.pop(name), linear.weight, linear.bias, grads)
        _set_submodule(model, name, linear)
    restore_requires_grad(model)
    return targets


def select_layers(model: nn.Module, filter_fn: Optional[FilterFn] = None, *, include: Optional[Iterable[str]] = None,
                  exclude: Optional[Iterable[str]] = None) -> list[str]:
    """Names of the nn.Linear / Conv1D layers that `filter_fn` accepts and/or `include` matches
    (None: any), minus the `exclude` matches, in module order."""
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude take a list of fnmatch patterns, not one string")
    include, exclude = (None if include is None else tuple(include)), tuple(exclude or ())
    return [name for name, m in model.named_modules()
            if is_linear_like(m) and (include is None or _matches(name, include)) and not _matches(name, exclude)
            and (filter_fn is None or filter_fn(m, name))]


def remember_requires_grad(model: nn.Module) -> None:
    """Record every parameter's requires_grad before the first conversion (`restore_requires_grad` undoes)."""
    if _REQUIRES_GRAD not in model.__dict__:
        object.__setattr__(model, _REQUIRES_GRAD, {n: p.requires_grad for n, p in model.named_parameters()})


def restore_requires_grad(model: nn.Module) -> None:
    """Give every parameter the requires_grad `remember_requires_grad` recorded, and forget the record."""
    before = model.__dict__.pop(_REQUIRES_GRAD, None)
    if before is not None:
        for n, p in model.named_parameters():
            if n in before:
                p.requires_grad_(before[n])


def spectral_layers(model: nn.Module) -> dict[str, FusedSpectralLinear]:
    """The model's spectral layers by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedSpectralLinear)}
