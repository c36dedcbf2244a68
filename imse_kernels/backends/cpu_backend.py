"""C++ CPU backend (`csrc/cpu`): ATen GEMMs plus fused, deterministic OpenMP reductions for ds."""
from typing import Optional

import torch

from .. import _extension
from .compiled_backend import CompiledBackend


class CpuBackend(CompiledBackend):
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return _extension.reason("_C")

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"
