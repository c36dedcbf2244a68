"""Files the evaluation reads, written small the way the real ones look: JPEGs, ImageNet-C trees, CIFAR-C .npy,
safetensors checkpoints, a Hugging Face cache, and a pickle that must never be loaded."""
from pathlib import Path

import numpy as np
from PIL import Image

#: (width, height) of the test JPEGs: ImageNet-C's 224 square, ImageNet's landscape and portrait 500x375,
#: odd sizes, one smaller than the crop (torchvision pads it) and one very elongated.
JPEG_SIZES = ((224, 224), (500, 375), (375, 500), (257, 301), (301, 223), (100, 80), (640, 33))


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image (gradients, blobs and some grain) as (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 90 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + ph)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, max(6, min(width, height) / 3))
        img += rng.uniform(-60, 60, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB", quality: int = 90) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(width, height, seed)).convert(mode).save(path, "JPEG", quality=quality)
    return path


def write_imagenet_c_tree(root: Path, relpaths, corruptions=("gaussian_noise", "fog"), severities=(5,),
                          size=(64, 48)) -> Path:
    """`root/<corruption>/<severity>/<relpath>` JPEGs; the image at a relpath differs per domain."""
    for ci, c in enumerate(corruptions):
        for s in severities:
            for i, rel in enumerate(relpaths):
                write_jpeg(Path(root) / c / str(s) / rel, *size, seed=1000 * ci + 10 * s + i)
    return Path(root)


def write_cifar_c(root: Path, corruptions=("gaussian_noise", "fog"), n: int = 20, num_classes: int = 10,
                  labels_repeat: bool = True, seed: int = 0) -> tuple[dict, np.ndarray]:
    """RobustBench's layout with N = n: `<corruption>.npy` (5n, 32, 32, 3) uint8 and `labels.npy` (5n or n).

    Pixel (0, 0, 0) of image k of severity s is s and pixel (0, 0, 1) is k % 256, so a test can read back
    which block and which image it got. Returns ({corruption: array}, labels of one severity)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    arrays = {}
    for c in corruptions:
        x = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        for s in range(5):
            x[s * n:(s + 1) * n, 0, 0, 0] = s + 1
            x[s * n:(s + 1) * n, 0, 0, 1] = np.arange(n) % 256
        np.save(root / f"{c}.npy", x)
        arrays[c] = x
    np.save(root / "labels.npy", np.tile(labels, 5) if labels_repeat else labels)
    return arrays, labels


def write_damaged_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG whose Huffman table is damaged: its header and end marker are intact (an up-front header check
    passes it), a full decode fails."""
    path = write_jpeg(path, 40, 30, seed=seed)
    data = bytearray(path.read_bytes())
    i = data.index(b"\xff\xc4")  # DHT: the code counts after the marker, length and class byte
    data[i + 5:i + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


def write_safetensors(weights, path: Path) -> Path:
    """A safetensors checkpoint of `weights` (a module's state_dict, or a dict of tensors)."""
    from safetensors.torch import save_file

    tensors = weights.state_dict() if hasattr(weights, "state_dict") else weights
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_hub_cache(root: Path, repo: str, files: dict) -> Path:
    """The local Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}, each file
    written by files[name](path). Returns the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = Path(root) / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)
    return snap


class PickledOsCall:
    """Pickles as a call to os.system(command): a file holding it must be refused without running it (the
    default command leaves a file EVIL_RAN in the working folder if it ever runs)."""

    def __init__(self, command: str = "touch EVIL_RAN"):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))
