"""Image files in class folders: listing, reading with one-line errors, checking up front, and labels.

Labels: class folders named by ImageNet WordNet ids map to the standard 1000-class indices (timm's
ImageNetInfo, the sorted wnids, which is also what torchvision's ImageFolder gives a full ImageNet tree), so
a subset with missing classes still gets the right labels. Other names map to their sorted order, or to
what a label map file says.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import DataError, reason

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Scan modes: `header` opens every file and checks its format and end marker (fast: catches text files,
#: empty and truncated JPEG/PNG files); `decode` decodes every image in full (catches damage inside a file).
SCAN_MODES = ("header", "decode")

_SKIP_HINT = "replace the file, or pass --skip-unreadable to leave it out of every domain"
#: For a file the up-front check passed and the run could not decode (damage inside the compressed data).
_DECODE_HINT = ("replace the file, or pass --image-check decode --skip-unreadable to find such files before the run "
                "and leave them out of every domain")


def list_images(root: Path) -> list[str]:
    """Relative paths `<class>/.../<image>` of the image files under `root`'s class folders, sorted."""
    out = []
    for cls in sorted(p for p in os.listdir(root) if (root / p).is_dir()):
        for dirpath, _, files in os.walk(root / cls):
            out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files
                    if f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(out)


def read_image(path: Path, transform: Callable):
    """`transform(RGB PIL image)` of the file; any failure to read it is a DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(path, "image file not found",
                        "check the folder tree (every domain holds the same images)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL: SyntaxError on bad headers
        if isinstance(exc, DataError):
            raise
        raise DataError(path, f"cannot read image ({reason(exc)})", _DECODE_HINT) from None


def _problem_of(path: Path, mode: str) -> Optional[str]:
    """None for a readable image, else what is wrong with it (one line)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1024))
            tail = f.read().rstrip(b"\0")
        with Image.open(path) as im:
            fmt = im.format
            if mode == "decode":
                im.load()
    except UnidentifiedImageError:
        kind = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not an image"
        return f"{kind}, not an image PIL can read (starts {head[:12]!r})"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"damaged image ({reason(exc)})"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


@dataclass
class ImageScan:
    """Result of `scan_images`: the files that read, and (relative path, problem) of those that do not."""

    ok: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)


def scan_images(root: Path, relpaths: Sequence[str], mode: str = "header", workers: int = 0) -> ImageScan:
    """Check every file `root/rel` before a run (order kept). See SCAN_MODES."""
    if mode not in SCAN_MODES:
        raise DataError(None, f"unknown image check {mode!r}", f"choose one of {', '.join(SCAN_MODES)}")
    root = Path(root)
    rels = list(relpaths)

    def check(rel):
        p = root / rel
        return "file not found" if not p.is_file() else _problem_of(p, mode)

    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            problems = list(pool.map(check, rels))
    else:
        problems = [check(r) for r in rels]
    out = ImageScan()
    for rel, problem in zip(rels, problems):
        (out.ok.append(rel) if problem is None else out.unreadable.append((rel, problem)))
    return out


def unreadable_error(root: Path, scan: ImageScan) -> DataError:
    """The error for a scan that found unreadable files: the first one named, the count given."""
    rel, problem = scan.unreadable[0]
    more = f" (and {len(scan.unreadable) - 1} more unreadable files)" if len(scan.unreadable) > 1 else ""
    return DataError(Path(root) / rel, problem + more, _SKIP_HINT)


# ----------------------------------------------------------------------------------------------------- labels


@lru_cache(maxsize=1)
def _wnids() -> tuple:
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (timm's ImageNetInfo)."""
    return list(_wnids())


def are_wnids(names: Sequence[str]) -> bool:
    """Whether every name is an ImageNet-1k WordNet id."""
    wnids = set(_wnids())
    return bool(names) and all(n in wnids for n in names)


class LabelMap(dict):
    """A label map read from a file (`load_label_map`): folder name -> label, and the file it came from."""

    path: Optional[Path] = None


def class_index(names: Sequence[str], label_map: Optional[dict] = None) -> dict[str, int]:
    """Folder name -> label: `label_map` when given (it must cover every name), ImageNet indices when every
    name is a WordNet id, else sorted order."""
    if label_map is not None:
        missing = [n for n in names if n not in label_map]
        if missing:
            raise DataError(getattr(label_map, "path", None), "the label map has no entry for class folder(s) "
                            f"{', '.join(sorted(missing)[:5])}" + (" ..." if len(missing) > 5 else ""),
                            "add them to the label map file")
        return {n: int(label_map[n]) for n in names}
    if are_wnids(names):
        order = {n: i for i, n in enumerate(imagenet_wnids())}
        return {n: order[n] for n in names}
    return {n: i for i, n in enumerate(sorted(set(names)))}


def load_label_map(path) -> dict[str, int]:
    """A label map file: JSON `{"folder": index, ...}`, or text with one folder name per line (line k: label k)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "label map file not found", "give --label-map the path of a .json or .txt file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read the label map ({reason(exc)})", "give a UTF-8 .json or .txt file") from None
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON ({reason(exc)})", 'write {"folder": index, ...}') from None
        bad = [k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise DataError(path, f"label of {bad[0]!r} is not a non-negative integer", 'write {"folder": index, ...}')
        return _label_map(raw, path)
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(path, f"folder name {dup[0]!r} appears twice", "list each class folder once, in label order")
    if not names:
        raise DataError(path, "empty label map", "list the class folders one per line, in label order")
    return _label_map({n: i for i, n in enumerate(names)}, path)


def _label_map(mapping: dict, path: Path) -> LabelMap:
    out = LabelMap(mapping)
    out.path = path
    return out


def head_label_warning(root, names: Sequence[str], num_outputs: Optional[int], label_map_given: bool) -> Optional[str]:
    """A warning when a 1000-way head meets class folders that are not WordNet ids and no label map says what
    they are: the folders get labels 0..K-1, which the head reads as ImageNet's first classes."""
    if label_map_given or num_outputs != 1000 or not names or are_wnids(names):
        return None
    odd = sorted(n for n in names if n not in set(imagenet_wnids()))
    return (f"warning: {root}: class folders are not ImageNet WordNet ids (e.g. {odd[0]!r}); they get labels "
            f"0..{len(set(names)) - 1} in sorted order, which a 1000-way head scores as ImageNet classes 0.. "
            "(tench, goldfish, ...): pass --label-map FILE to say which class each folder is")
