"""`Source`: the unadapted model behind the adapters' call (`logits = adapter(x)`, `reset()`).

An `nn.Module` holding the model (in eval mode) as `self.model`; its `state_dict()` is the model's plus
the adapter marker of `tta.adapter`, so it saves and loads like the other adapters.
"""
import torch
from torch import Tensor, nn

from .adapter import Adapter


class Source(Adapter):
    """Source(model): the model in eval mode, no gradients, never changed (`train()`/`eval()` keep it so)."""

    kind = "Source"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Source: model must be an nn.Module, got {type(model).__name__}")
        self.model = model.eval()
        self.skipped_steps = 0

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def reset(self) -> None:
        """Nothing to reset: the model never changes."""
