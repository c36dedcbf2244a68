"""ImageNet-C on disk: `DIR/<corruption>/<severity>/<class>/<image>` (torchvision ImageFolder layout per domain).

Class folders named by ImageNet WordNet ids map to the standard 1000-class indices (timm's ImageNetInfo), so a
subset with missing classes still gets the right labels; other folder names map to their sorted union.
The same images (by relative path) are used in every domain; their order is shuffled once by the seed, since
class-sorted batches would make any entropy-based method collapse.
"""
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def _list_images(root: Path) -> list[str]:
    out = []
    for cls in sorted(p for p in os.listdir(root) if (root / p).is_dir()):
        for dirpath, _, files in os.walk(root / cls):
            for f in sorted(files):
                if f.lower().endswith(tuple(e.lower() for e in IMG_EXTENSIONS)):
                    out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def class_index(names: Sequence[str]) -> dict[str, int]:
    """Folder name -> label: ImageNet indices when every name is a WordNet id, else sorted order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = set(info.label_names())
    if names and all(n in wnids for n in names):
        order = {n: i for i, n in enumerate(info.label_names())}
        return {n: order[n] for n in names}
    return {n: i for i, n in enumerate(sorted(set(names)))}


class ImageFolderDomain:
    """One domain folder; images loaded with PIL, resized/cropped to the model's input size, in [0, 1]."""

    def __init__(self, root: Path, relpaths: Sequence[str], classes: dict[str, int], input_size: int,
                 crop_pct: float = 1.0, interpolation: str = "bilinear", workers: int = 0):
        self.root, self.relpaths, self.classes = root, list(relpaths), classes
        self.input_size, self.crop_pct, self.interpolation, self.workers = input_size, crop_pct, interpolation, workers

    def __len__(self) -> int:
        return len(self.relpaths)

    def _transform(self):
        from torchvision import transforms as T

        modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                 "nearest": T.InterpolationMode.NEAREST}
        resize = int(round(self.input_size / self.crop_pct))
        return T.Compose([T.Resize(resize, interpolation=modes.get(self.interpolation, T.InterpolationMode.BILINEAR)),
                          T.CenterCrop(self.input_size), T.ToTensor()])

    def __getitem__(self, i: int):
        from PIL import Image

        rel = self.relpaths[i]
        with Image.open(self.root / rel) as im:
            x = self._transform()(im.convert("RGB"))
        return x, self.classes[Path(rel).parts[0]]

    @property
    def labels(self) -> list[int]:
        """The label of every image, in order (from the class folders; no image is read)."""
        return [self.classes[Path(r).parts[0]] for r in self.relpaths]

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `indices` (in that order) and their labels; `workers` > 0 decodes them in that many threads."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"image index {bad[0]} out of range for a domain of {n} images")
        if self.workers > 0 and len(idx) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.workers) as pool:
                items = list(pool.map(self.__getitem__, idx))
        else:
            items = [self[i] for i in idx]
        if not items:
            raise ValueError("get() needs at least one index")
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    def batches(self, batch_size: int, start: int = 0, count: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self) if count < 0 else count
        idx = [(start + k) % len(self) for k in range(n)]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self, idx), batch_size=batch_size, shuffle=False,
                                             num_workers=self.workers)
        yield from loader


class ImageNetC:
    """`domain(corruption, severity)` for a folder tree; checks the tree up front and names what is missing."""

    def __init__(self, data_dir: str, corruptions: Sequence[str], severities: Sequence[int], input_size: int,
                 crop_pct: float = 1.0, interpolation: str = "bilinear", max_per_domain: Optional[int] = None,
                 seed: int = 0, workers: int = 0):
        if not data_dir:
            raise FileNotFoundError("--data imagenet-c needs --data-dir DIR (layout DIR/<corruption>/<severity>/<class>/...)")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNet-C directory not found: {root}")
        missing = [f"{c}/{s}" for c in corruptions for s in severities if not (root / c / str(s)).is_dir()]
        if missing:
            raise FileNotFoundError(f"ImageNet-C directory {root} lacks domain folder(s): {', '.join(missing[:8])}"
                                    + (" ..." if len(missing) > 8 else ""))
        first = root / corruptions[0] / str(severities[0])
        rel = _list_images(first)
        if not rel:
            raise FileNotFoundError(f"no images under {first} (expected <class>/<image> files)")
        gen = torch.Generator().manual_seed(seed)
        rel = [rel[i] for i in torch.randperm(len(rel), generator=gen).tolist()]
        if max_per_domain:
            rel = rel[:max_per_domain]
        self.root, self.relpaths = root, rel
        self.classes = class_index(sorted({Path(r).parts[0] for r in _list_images(first)}))
        self.kw = dict(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation, workers=workers)

    def domain(self, corruption: str, severity: int) -> ImageFolderDomain:
        d = self.root / corruption / str(severity)
        absent = [r for r in self.relpaths[:64] if not (d / r).is_file()]
        if absent:
            raise FileNotFoundError(f"{d} lacks images present in the first domain, e.g. {absent[0]}")
        return ImageFolderDomain(d, self.relpaths, self.classes, **self.kw)

    @property
    def labels(self) -> list[int]:
        """The labels of a domain's images, in order: the same images (by relative path) in every domain."""
        return [self.classes[Path(r).parts[0]] for r in self.relpaths]

    @property
    def num_classes(self) -> int:
        return max(self.classes.values()) + 1
