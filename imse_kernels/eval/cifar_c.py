"""CIFAR-10-C and CIFAR-100-C in RobustBench's `.npy` layout, memory-mapped.

`DIR/<corruption>.npy` (severities 1..5 stacked) and `DIR/labels.npy`; a domain is the severity's block, its first
`n_examples` images, as RobustBench's `load_cifar10c(..., shuffle=False)`. docs/design.md, section 13.
"""
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_max_per_domain
from .corruptions import corruption_order, select_corruptions
from .errors import DataError, reason
from .protocol import DEFAULT_REPORTS, DataProtocol

#: Data set name -> (folder name in RobustBench's layout, number of classes).
CIFAR_C = {"cifar10-c": ("CIFAR-10-C", 10), "cifar100-c": ("CIFAR-100-C", 100)}

SEVERITIES = 5


def _open_npy(path: Path) -> np.ndarray:
    """The array in `path`, memory-mapped read-only; never unpickles."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise DataError(path, f"not a .npy array (starts {magic!r})", "give RobustBench's CIFAR-C .npy files")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, "file not found", "check --data-dir") from None
    except DataError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "allow_pickle" in text or "Object arrays" in text or "Python objects" in text:
            raise DataError(path, "holds Python objects, not a numeric array (loading it would unpickle code)",
                            "save the images with np.save(arr.astype(np.uint8))") from None
        if "mmap length" in text or "cannot reshape" in text or "size" in text:
            raise DataError(path, f"truncated .npy file ({reason(exc)})", "download or copy it again") from None
        raise DataError(path, f"not a .npy array ({reason(exc)})", "give RobustBench's CIFAR-C .npy files") from None
    except (OSError, EOFError) as exc:
        raise DataError(path, f"not a readable .npy file ({reason(exc)})", "download or copy it again") from None


def find_root(data_dir: Union[str, Path], dataset: str) -> Path:
    """The folder that holds `labels.npy`: `data_dir` itself or its `CIFAR-10-C/` (`CIFAR-100-C/`)."""
    if dataset not in CIFAR_C:
        raise DataError(None, f"unknown data set {dataset!r}", f"choose one of {', '.join(CIFAR_C)}")
    if not data_dir:
        raise DataError(None, f"--data {dataset} needs --data-dir DIR", "give the folder that holds labels.npy "
                        "and <corruption>.npy")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(root, f"{CIFAR_C[dataset][0]} directory not found", "give --data-dir the folder that "
                        "holds labels.npy and <corruption>.npy")
    inner = root / CIFAR_C[dataset][0]
    if not (root / "labels.npy").exists() and (inner / "labels.npy").exists():
        return inner
    return root


class ArrayDomain:
    """One (corruption, severity) block of a memory-mapped (M, H, W, 3) uint8 array: `batches`, `get`, `labels`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: Optional[int] = None):
        self.images, self._labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> list[int]:
        return [int(y) for y in self._labels]

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float() / 255  # copy: off the map
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0, 1)
        return x

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at `indices` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("get() needs at least one index")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"image index {int(idx.max() if idx.max() >= len(self) else idx.min())} out of range "
                             f"for a domain of {len(self)} images")
        return self._tensor(self.images[idx]), torch.from_numpy(self._labels[idx].astype(np.int64))

    def batches(self, batch_size: int, start: int = 0, count: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self) if count < 0 else count
        for i in range(0, n, batch_size):
            j = (np.arange(i, min(i + batch_size, n)) + start) % len(self)
            if j[0] + len(j) - 1 == j[-1]:  # contiguous: one slice of the memory map
                yield (self._tensor(self.images[j[0]:j[-1] + 1]),
                       torch.from_numpy(self._labels[j[0]:j[-1] + 1].astype(np.int64)))
            else:
                yield self.get(j)


class CifarC:
    """`domain(corruption, severity)` for a CIFAR-10-C / CIFAR-100-C folder; every file checked on opening.

    `corruptions`: a list, a comma-separated string or "all" (every `<name>.npy` present). `n_examples`:
    images per domain (RobustBench's `n_examples`; None: all N). `size`: resize to this many pixels
    (bilinear) for models that take another input size; None reads the images as they are.
    """

    def __init__(self, data_dir: Union[str, Path], dataset: str = "cifar10-c",
                 corruptions: Union[str, Sequence[str], None] = "all", severities: Sequence[int] = (5,),
                 n_examples: Optional[int] = None, size: Optional[int] = None):
        self.dataset = dataset
        self.root = find_root(data_dir, dataset)
        self.num_classes = CIFAR_C[dataset][1]
        check_max_per_domain(n_examples)
        bad = [s for s in severities if int(s) != s or not 1 <= s <= SEVERITIES]
        if bad or not severities:
            raise DataError(None, f"severity must be 1..{SEVERITIES}, got {bad[0] if bad else 'none'}", "")
        self.severities = [int(s) for s in severities]
        self.size = size
        available = corruption_order(p.stem for p in self.root.glob("*.npy") if p.stem != "labels")
        self.corruptions = select_corruptions(corruptions, available, str(self.root))
        self._labels_all = self._read_labels()
        self._arrays: dict[str, np.ndarray] = {}
        self._n = 0
        for c in self.corruptions:
            self._arrays[c] = self._read_images(c)
        self.n_per_severity = self._n
        if n_examples is not None and n_examples > self._n:
            raise DataError(None, f"--max-per-domain {n_examples} is more than the {self._n} images per domain",
                            f"pass at most {self._n}")
        self.n_examples = self._n if n_examples is None else int(n_examples)

    def _read_labels(self) -> np.ndarray:
        path = self.root / "labels.npy"
        if not path.is_file():
            raise DataError(path, "labels.npy missing", "copy labels.npy from the CIFAR-C release next to the "
                            "<corruption>.npy files")
        y = _open_npy(path)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) == 0:
            raise DataError(path, f"labels must be a 1-D integer array, got {y.dtype} of shape {tuple(y.shape)}",
                            "give the CIFAR-C release's labels.npy")
        lo, hi = int(np.min(y)), int(np.max(y))
        if lo < 0 or hi >= self.num_classes:
            raise DataError(path, f"labels run {lo}..{hi}, outside 0..{self.num_classes - 1} for {self.dataset}",
                            "check --data (cifar10-c or cifar100-c) and the file")
        return y

    def _read_images(self, corruption: str) -> np.ndarray:
        """The memory-mapped file, checked: shape (5·N, H, W, 3), uint8, N the same in every file, and
        labels.npy holding N or 5·N labels."""
        path = self.root / f"{corruption}.npy"
        x = _open_npy(path)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(path, f"expected (5·N, H, W, 3) images, got shape {tuple(x.shape)}",
                            "give RobustBench's CIFAR-C .npy files (severities 1..5 stacked)")
        if x.dtype != np.uint8:
            raise DataError(path, f"expected uint8 pixels, got {x.dtype}", "save the images as uint8 0..255")
        if len(x) == 0 or len(x) % SEVERITIES:
            raise DataError(path, f"holds {len(x)} images, not 5 equal severity blocks",
                            "give RobustBench's CIFAR-C .npy files (severities 1..5 stacked)")
        n = len(x) // SEVERITIES
        if self._n and n != self._n:
            raise DataError(path, f"holds {n} images per severity, other files {self._n}",
                            "use files of one release")
        n_labels = len(self._labels_all)
        if n_labels not in (n, SEVERITIES * n):
            raise DataError(self.root / "labels.npy", f"holds {n_labels} labels, but {path.name} holds 5·{n} images "
                            f"(expected {n} or {SEVERITIES * n} labels)", "use the labels.npy of the same release")
        self._n = n
        return x

    def _labels_of(self, severity: int) -> np.ndarray:
        y = self._labels_all
        if len(y) == SEVERITIES * self._n:
            return np.asarray(y[(severity - 1) * self._n:severity * self._n])
        return np.asarray(y[:self._n])

    def domain(self, corruption: str, severity: int) -> ArrayDomain:
        if corruption not in self._arrays:
            raise DataError(self.root, f"corruption {corruption!r} was not opened",
                            f"choose from {', '.join(self.corruptions)}")
        if severity not in self.severities:
            raise DataError(None, f"severity {severity} was not opened", f"choose from {self.severities}")
        lo = (severity - 1) * self._n
        images = self._arrays[corruption][lo:lo + self.n_examples]
        return ArrayDomain(images, self._labels_of(severity)[:self.n_examples], self.size)

    @property
    def labels(self) -> list[int]:
        """The labels of a domain's images, in order (the same in every domain of one severity)."""
        return [int(v) for v in self._labels_of(self.severities[-1])[:self.n_examples]]

    @property
    def images_per_domain(self) -> int:
        return self.n_examples

    @property
    def image_size(self) -> int:
        """The side of the stored images (32 in the release)."""
        return int(next(iter(self._arrays.values())).shape[1])

    def protocol(self, reports: Optional[str] = None) -> DataProtocol:
        subset = "RobustBench .npy, first n_examples of each severity block"
        return DataProtocol(self.dataset, subset, self.n_examples, "file order", None,
                            reports or DEFAULT_REPORTS[self.dataset])
