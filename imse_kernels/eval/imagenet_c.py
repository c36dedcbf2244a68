"""ImageNet-C on disk: `DIR/<corruption>/<severity>/<class>/<image>` (torchvision ImageFolder layout per domain).

Subsets `5000` (RobustBench's fixed list, in its order) and `full` (every image, shuffled by the seed); the same
images in every domain; decoded with PIL in threads through the named pipeline. docs/design.md, section 13.
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from .checks import check_max_per_domain
from .corruptions import corruption_order, select_corruptions
from .errors import DataError
from .images import (
    IMG_EXTENSIONS,
    ImageScan,
    class_index,
    head_label_warning,
    list_images,
    read_image,
    scan_images,
    unreadable_error,
)
from .preprocess import Preprocess, build_preprocess, timm_eval
from .protocol import DEFAULT_REPORTS, DataProtocol

__all__ = ["ImageNetC", "ImageFolderDomain", "class_index", "list_images", "IMG_EXTENSIONS", "SUBSETS",
           "subset_5000"]

#: The image subsets: RobustBench's 5,000-image list, or every image on disk.
SUBSETS = ("5000", "full")
SUBSET_HELP = {"5000": "RobustBench's fixed 5,000-image list in its order (CoTTA, ViDA, IMSE; NUM_EX = first N)",
               "full": "every image of a domain (50,000 in ImageNet-C), shuffled by the seed"}

#: SHA-256 of the shipped list (data/robustbench_imagenet_5000.txt), copied unchanged from RobustBench.
SUBSET_5000_SHA256 = "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574"
_SUBSET_5000_FILE = Path(__file__).with_name("data") / "robustbench_imagenet_5000.txt"


def subset_5000() -> list[str]:
    """RobustBench's 5,000 `<wnid>/<file>` paths, in order."""
    data = _SUBSET_5000_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != SUBSET_5000_SHA256:  # pragma: no cover - a damaged install
        raise DataError(_SUBSET_5000_FILE, "the packaged image list differs from RobustBench's",
                        "reinstall imse_kernels")
    return [ln for ln in data.decode().split("\n") if ln]


def _as_preprocess(preprocess, input_size: int, crop_pct: float, interpolation: str) -> Preprocess:
    """A Preprocess from a name, an instance, or (None) the timm transform of the given data config."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess is None or preprocess == "timm":
        return timm_eval({"input_size": (3, input_size, input_size), "crop_pct": crop_pct,
                          "interpolation": interpolation})
    return build_preprocess(preprocess)


class ImageFolderDomain:
    """One domain folder: images read with PIL and the pipeline, in [0, 1]; `workers` threads decode them."""

    def __init__(self, root: Path, relpaths: Sequence[str], classes: dict[str, int], input_size: int = 224,
                 crop_pct: float = 1.0, interpolation: str = "bilinear", workers: int = 0, *,
                 preprocess: Union[str, Preprocess, None] = None):
        self.root, self.relpaths, self.classes, self.workers = Path(root), list(relpaths), classes, workers
        self.preprocess = _as_preprocess(preprocess, input_size, crop_pct, interpolation)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int):
        rel = self.relpaths[i]
        return read_image(self.root / rel, self.preprocess), self.classes[Path(rel).parts[0]]

    @property
    def labels(self) -> list[int]:
        """The label of every image, in order (from the class folders; no image is read)."""
        return [self.classes[Path(r).parts[0]] for r in self.relpaths]

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `indices` (in that order) and their labels."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"image index {bad[0]} out of range for a domain of {n} images")
        if not idx:
            raise ValueError("get() needs at least one index")
        if self.workers > 0 and len(idx) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                items = list(pool.map(self.__getitem__, idx))
        else:
            items = [self[i] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    def batches(self, batch_size: int, start: int = 0, count: int = -1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`count` images (all: -1) from `start` (wrapping around), in batches; the next batch is decoded while
        the caller works on this one."""
        n = len(self) if count < 0 else count
        idx = [(start + k) % len(self) for k in range(n)]
        chunks = [idx[i:i + batch_size] for i in range(0, n, batch_size)]
        if not chunks:
            return
        with ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self.get, chunks[0])
            for nxt in chunks[1:] + [None]:
                batch = pending.result()
                if nxt is not None:
                    pending = ahead.submit(self.get, nxt)
                yield batch


def available_corruptions(root: Path, severities: Sequence[int]) -> list[str]:
    """Corruption folders under `root` that hold every one of `severities`, in the published order."""
    names = [p.name for p in Path(root).iterdir() if p.is_dir()
             and all((p / str(s)).is_dir() for s in severities)]
    return corruption_order(names)


class ImageNetC:
    """`domain(corruption, severity)` for a folder tree; checks the tree up front and names what is missing.

    `corruptions`: a list, a comma-separated string, or "all" (every folder with the severities).
    `preprocess`: a name from preprocess.PREPROCESS or a Preprocess; None keeps the timm transform of
    (input_size, crop_pct, interpolation). `label_map`: folder name -> label (images.load_label_map).
    """

    def __init__(self, data_dir: str, corruptions: Union[str, Sequence[str]], severities: Sequence[int],
                 input_size: int = 224, crop_pct: float = 1.0, interpolation: str = "bilinear",
                 max_per_domain: Optional[int] = None, seed: int = 0, workers: int = 0, *,
                 preprocess: Union[str, Preprocess, None] = None, subset: str = "full",
                 label_map: Optional[dict] = None):
        if not data_dir:
            raise DataError(None, "--data imagenet-c needs --data-dir DIR",
                            "give the folder that holds <corruption>/<severity>/<class>/<image>")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(root, "ImageNet-C directory not found" if not root.exists() else "not a directory",
                            "give --data-dir the folder that holds <corruption>/<severity>/<class>/<image>")
        if subset not in SUBSETS:
            raise DataError(None, f"unknown ImageNet-C subset {subset!r}", f"choose one of {', '.join(SUBSETS)}")
        check_max_per_domain(max_per_domain)
        severities = [int(s) for s in severities]
        self.root, self.severities, self.subset, self.seed = root, severities, subset, seed
        self.corruptions = self._corruptions(corruptions)
        first = root / self.corruptions[0] / str(severities[0])
        on_disk = list_images(first)
        if not on_disk:
            raise DataError(first, "no images here", "expected <class>/<image> files (ImageFolder layout)")
        if subset == "5000":
            rel = subset_5000()
            if max_per_domain is not None and max_per_domain > len(rel):
                raise DataError(None, f"--max-per-domain {max_per_domain} is more than the subset's {len(rel)} images",
                                "pass at most 5000, or --subset full")
            rel = rel[:max_per_domain]
            present = set(on_disk)
            absent = [r for r in rel if r not in present]
            if absent:
                raise DataError(first, f"lacks {len(absent)} of the {len(rel)} listed images, e.g. {absent[0]}",
                                "use the complete ImageNet-C tree, or --subset full for the images present")
        else:
            gen = torch.Generator().manual_seed(seed)
            rel = [on_disk[i] for i in torch.randperm(len(on_disk), generator=gen).tolist()][:max_per_domain]
        self.relpaths = rel
        self.class_names = sorted({Path(r).parts[0] for r in on_disk})
        self.label_map_given = label_map is not None
        self.classes = class_index(self.class_names, label_map)
        self.preprocess = _as_preprocess(preprocess, input_size, crop_pct, interpolation)
        self.workers = workers
        self.skipped: list[tuple[str, str]] = []

    def _corruptions(self, spec) -> list[str]:
        if spec is None or spec == "all":
            return select_corruptions("all", available_corruptions(self.root, self.severities), str(self.root))
        names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        missing = [f"{c}/{s}" for c in names for s in self.severities if not (self.root / c / str(s)).is_dir()]
        if missing:
            have = ", ".join(available_corruptions(self.root, self.severities)) or "none"
            raise DataError(self.root, f"lacks domain folder(s) {', '.join(missing[:8])}"
                            + (" ..." if len(missing) > 8 else ""), f"corruptions present: {have}")
        return names

    def domain(self, corruption: str, severity: int) -> ImageFolderDomain:
        d = self.root / corruption / str(severity)
        absent = [r for r in self.relpaths[:64] if not (d / r).is_file()]
        if absent:
            raise DataError(d, f"lacks images present in the first domain, e.g. {absent[0]}",
                            "every domain must hold the same images (re-extract it)")
        return ImageFolderDomain(d, self.relpaths, self.classes, workers=self.workers, preprocess=self.preprocess)

    def check_images(self, mode: str = "header", skip_unreadable: bool = False) -> dict:
        """Check every chosen image of every domain before a run (images.SCAN_MODES).

        An unreadable file is a DataError naming it, or with `skip_unreadable` its relative path is left out of
        every domain (so all domains keep the same images); returns {"checked": n, "skipped": [(domain/rel,
        problem), ...]}. Raises when nothing would be left."""
        bad: dict[str, str] = {}
        checked = 0
        for c in self.corruptions:
            for s in self.severities:
                d = self.root / c / str(s)
                scan: ImageScan = scan_images(d, self.relpaths, mode, self.workers)
                checked += len(self.relpaths)
                if scan.unreadable and not skip_unreadable:
                    raise unreadable_error(d, scan)
                for rel, problem in scan.unreadable:
                    bad.setdefault(rel, f"{c}/{s}/{rel}: {problem}")
        if bad:
            self.relpaths = [r for r in self.relpaths if r not in bad]
            self.skipped = [(k, v) for k, v in bad.items()]
            if not self.relpaths:
                raise DataError(self.root, "every chosen image is unreadable", "check the files (e.g. with PIL)")
        return {"checked": checked, "skipped": [v for _, v in self.skipped]}

    def label_warning(self, num_outputs: Optional[int]) -> Optional[str]:
        """The warning for a 1000-way head and class folders that are not WordNet ids (images.py)."""
        return head_label_warning(self.root, self.class_names, num_outputs, self.label_map_given)

    def protocol(self, reports: Optional[str] = None) -> DataProtocol:
        subset = ("RobustBench's 5,000-image list" if self.subset == "5000" else "all images on disk")
        order = "fixed order" if self.subset == "5000" else f"shuffled by seed {self.seed}"
        return DataProtocol("imagenet-c", subset, len(self.relpaths), order, self.preprocess.as_dict(),
                            reports or DEFAULT_REPORTS["imagenet-c"])

    @property
    def labels(self) -> list[int]:
        """The labels of a domain's images, in order: the same images (by relative path) in every domain."""
        return [self.classes[Path(r).parts[0]] for r in self.relpaths]

    @property
    def num_classes(self) -> int:
        return max(self.classes.values()) + 1

    @property
    def images_per_domain(self) -> int:
        return len(self.relpaths)
