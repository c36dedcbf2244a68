"""GPT-2's `Conv1D` seen as a linear layer: y = x·W + b with W stored (d_in, d_out), the transpose of
`nn.Linear`'s weight. Recognised by its class name and shape, so `transformers` is never imported here."""
import copy
from typing import Optional

import torch
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face `Conv1D` (GPT-2, GPT, ...): weight (nx, nf), forward x·W + b."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def linear_weight(module: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """(weight as nn.Linear holds it, (d_out, d_in); bias or None) of an nn.Linear or a Conv1D.
    For a Conv1D the weight is a transposed view (no copy)."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if is_conv1d(module):
        return module.weight.t(), module.bias
    raise TypeError(f"expected nn.Linear or a Hugging Face Conv1D, got {type(module).__name__}")


def linear_view(conv: nn.Module) -> nn.Linear:
    """An nn.Linear sharing the Conv1D's storage (its weight is the transposed view), e.g. to factorize it."""
    weight, bias = linear_weight(conv)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return lin


def conv1d_shell(conv: nn.Module) -> nn.Module:
    """A copy of the Conv1D with its parameters dropped (the original is untouched): what
    `rebuild_conv1d` fills again to merge a converted layer back into a GPT-2 checkpoint's layout."""
    shell = copy.copy(conv)
    shell._parameters = {name: None for name in conv._parameters}
    return shell


def rebuild_linear(weight: Tensor, bias: Optional[Tensor],
                   requires_grad: tuple[bool, bool] = (True, True)) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (d_out, d_in) and `bias`, with the given `requires_grad`."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(requires_grad[0])
    if linear.bias is not None:
        linear.bias.requires_grad_(requires_grad[1])
    return linear


def rebuild_conv1d(shell: nn.Module, weight: Tensor, bias: Optional[Tensor],
                   requires_grad: tuple[bool, bool] = (True, True)) -> nn.Module:
    """A Conv1D like `shell` holding `weight` (nn.Linear layout, (d_out, d_in); stored transposed) and `bias`."""
    conv = copy.copy(shell)
    conv._parameters = {name: None for name in shell._parameters}
    with torch.no_grad():
        conv.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=requires_grad[0])
        conv.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=requires_grad[1])
    return conv
