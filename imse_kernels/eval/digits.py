"""The embedded data set: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package).

Images are upsampled to 32x32 (bilinear) and replicated to 3 channels, values in [0, 1]
(ink bright on a dark background). The split is stratified and fixed by a seed.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
IMG_SIZE = 32
NATIVE_SIZE = 8
#: Pixels per scanned pixel: the corruptions' grain and spatial extents are scaled by it (see corruptions.py).
CONTENT_SCALE = IMG_SIZE // NATIVE_SIZE


@dataclass
class Split:
    """Images (N, 3, H, W) float32 in [0, 1] and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _load_raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded data set needs scikit-learn (pip install scikit-learn); "
                          "or pass --data imagenet-c --data-dir DIR") from exc
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def to_rgb32(images: np.ndarray, size: int = IMG_SIZE) -> torch.Tensor:
    """(N, 8, 8) grey values in [0, 1] -> (N, 3, size, size) float32."""
    x = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()


def load_splits(n_test: int = 512, seed: int = 0, size: int = IMG_SIZE) -> tuple[Split, Split]:
    """(train, test): `n_test` test images chosen per class in proportion, the rest for training."""
    images, labels = _load_raw()
    if not 0 < n_test < len(labels):
        raise ValueError(f"n_test must be in 1..{len(labels) - 1}, got {n_test}")
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(n_test * len(idx) / len(labels)))])
    test_idx = np.concatenate(test_idx)
    # Adjust to exactly n_test, then shuffle so that test batches mix classes.
    rest = np.setdiff1d(np.arange(len(labels)), test_idx)
    if len(test_idx) > n_test:
        test_idx = rng.choice(test_idx, n_test, replace=False)
    elif len(test_idx) < n_test:
        test_idx = np.concatenate([test_idx, rng.choice(rest, n_test - len(test_idx), replace=False)])
    test_idx = rng.permutation(test_idx)
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(labels)), test_idx))
    x = to_rgb32(images, size)
    y = torch.from_numpy(labels)
    return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx])
