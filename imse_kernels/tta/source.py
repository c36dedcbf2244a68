"""`Source`: the unadapted model behind the adapters' call (`logits = adapter(x)`, `reset()`)."""
import torch
from torch import Tensor, nn


class Source:
    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.skipped_steps = 0

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self.model(x)

    def reset(self) -> None:
        """Nothing to reset: the model never changes."""
