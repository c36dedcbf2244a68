"""Domains of the embedded default: the digits test split corrupted per (corruption, severity), computed once."""
from typing import Iterator

import torch

from .corruptions import corrupt
from .digits import CONTENT_SCALE, Split


class TensorDomain:
    """Images and labels held in memory; batches in a fixed order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, start: int = 0, count: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self) if count < 0 else count
        idx = (torch.arange(n) + start) % len(self)
        for i in range(0, n, batch_size):
            j = idx[i:i + batch_size]
            yield self.images[j], self.labels[j]

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at `indices` (the image-by-image settings)."""
        j = torch.as_tensor(indices, dtype=torch.long)
        return self.images[j], self.labels[j]


class CorruptedDigits:
    """`domain(corruption, severity)` -> TensorDomain of the corrupted test split (deterministic for `seed`)."""

    def __init__(self, test: Split, seed: int = 0, scale: int = CONTENT_SCALE):
        self.test, self.seed, self.scale = test, seed, scale
        self._cache: dict[tuple[str, int], TensorDomain] = {}

    def domain(self, corruption: str, severity: int) -> TensorDomain:
        key = (corruption, int(severity))
        if key not in self._cache:
            # uint8 storage, as published corrupted data sets are (corrupt() already rounds to the 8-bit grid).
            x = corrupt(self.test.images, corruption, severity, self.seed, self.scale)
            self._cache[key] = TensorDomain(torch.round(x * 255).to(torch.uint8), self.test.labels)
        d = self._cache[key]
        return _Float(d)


class _Float(TensorDomain):
    """A uint8 TensorDomain seen as floats in [0, 1]."""

    def __init__(self, d: TensorDomain):
        super().__init__(d.images, d.labels)

    def batches(self, batch_size, start=0, count=-1):
        for x, y in super().batches(batch_size, start, count):
            yield x.float() / 255, y

    def get(self, indices):
        x, y = super().get(indices)
        return x.float() / 255, y
