"""The named input pipelines give the pixels of the published transforms they name, on JPEGs of many sizes.

Three references per choice: the transform as RobustBench / SAR / timm write it (torchvision and timm objects
built here), a plain PIL + numpy re-derivation of torchvision's semantics (short side, truncation, round-half
crop offsets, zero padding), and the ImageNet-C loader's output for the same file. Equality is exact.
"""
import math

import numpy as np
import pytest
import torch
from eval_files import JPEG_SIZES, write_imagenet_c_tree, write_jpeg
from PIL import Image

from imse_kernels.eval.errors import DataError
from imse_kernels.eval.imagenet_c import ImageNetC
from imse_kernels.eval.preprocess import PREPROCESS, build_preprocess, check_input_size

T = pytest.importorskip("torchvision.transforms")

# vit_base_patch16_224's data config (timm): bicubic, crop_pct 0.9
VIT_B_CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
             "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def published(name):
    """The transform each choice names, written as its authors write it (RobustBench data.py, SAR's
    selectedRotateImageFolder.py without its Normalize, timm's create_transform)."""
    if name == "res256crop224":
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    if name == "crop224":
        return T.Compose([T.CenterCrop(224), T.ToTensor()])
    import timm.data

    full = timm.data.create_transform(**VIT_B_CFG, is_training=False)  # ends in Normalize(mean, std)
    return full


def pil_reference(im: Image.Image, name: str) -> torch.Tensor:
    """torchvision's PIL path re-derived with PIL and numpy only."""
    def resize_short(im, size, resample):
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = size, int(size * long / short)
        new = (new_short, new_long) if w <= h else (new_long, new_short)
        return im if new == (w, h) else im.resize(new, resample)

    def center_crop(im, size):
        w, h = im.size
        if w < size or h < size:
            left, top = max(0, (size - w) // 2), max(0, (size - h) // 2)
            right, bottom = max(0, (size - w + 1) // 2), max(0, (size - h + 1) // 2)
            canvas = Image.new(im.mode, (w + left + right, h + top + bottom), 0)
            canvas.paste(im, (left, top))
            im, (w, h) = canvas, canvas.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return im.crop((left, top, left + size, top + size))

    if name == "res256crop224":
        im = resize_short(im, 256, Image.BILINEAR)
    elif name == "timm":
        im = resize_short(im, math.floor(224 / 0.9), Image.BICUBIC)  # 248: timm floors size / crop_pct
    im = center_crop(im, 224)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    files = [write_jpeg(root / f"{w}x{h}.JPEG", w, h, seed=i) for i, (w, h) in enumerate(JPEG_SIZES)]
    files.append(write_jpeg(root / "grey_300x260.JPEG", 300, 260, seed=50, mode="L"))
    return files


def _rgb(path):
    with open(path, "rb") as f:  # RobustBench's pil_loader
        return Image.open(f).convert("RGB")


@pytest.mark.parametrize("name", PREPROCESS)
def test_each_choice_equals_the_transform_it_names(jpegs, name):
    ours = build_preprocess(name, VIT_B_CFG)
    theirs = published(name)
    for path in jpegs:
        im = _rgb(path)
        x = ours(im)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32, path.name
        if name == "timm":  # timm's transform normalises; ours leaves that to the model
            want = theirs(im)
            got = T.Normalize(torch.tensor(VIT_B_CFG["mean"]), torch.tensor(VIT_B_CFG["std"]))(x)
        else:
            want, got = theirs(im), x
        assert torch.equal(got, want), f"{name} {path.name}: max |diff| {(got - want).abs().max().item()}"
        assert torch.equal(x, pil_reference(im, name)), f"{name} {path.name} differs from the PIL re-derivation"


def test_the_choices_really_differ(jpegs):
    """The comparison above is sensitive: the three pipelines give different pixels on the same photo."""
    im = _rgb(jpegs[1])  # 500x375
    xs = {n: build_preprocess(n, VIT_B_CFG)(im) for n in PREPROCESS}
    for a in PREPROCESS:
        for b in PREPROCESS:
            if a < b:
                assert (xs[a] - xs[b]).abs().max() > 0.1, (a, b)
    square = _rgb(jpegs[0])  # 224x224: crop224 is the identity, res256crop224 resamples
    assert torch.equal(build_preprocess("crop224")(square), T.ToTensor()(square))
    assert (build_preprocess("res256crop224")(square) - T.ToTensor()(square)).abs().max() > 0.05


@pytest.mark.parametrize("name", PREPROCESS)
def test_the_imagenet_c_loader_gives_the_same_pixels(tmp_path, name):
    rels = [f"n01440764/ILSVRC2012_val_{i:08d}.JPEG" for i in range(3)]
    sizes = [(500, 375), (375, 500), (224, 224)]
    for i, (rel, size) in enumerate(zip(rels, sizes)):
        write_jpeg(tmp_path / "inc" / "fog" / "5" / rel, *size, seed=i)
    data = ImageNetC(str(tmp_path / "inc"), ["fog"], [5], preprocess=build_preprocess(name, VIT_B_CFG))
    dom = data.domain("fog", 5)
    x, _ = dom.get(range(len(dom)))
    theirs = published(name)
    for k, rel in enumerate(dom.relpaths):
        im = _rgb(tmp_path / "inc" / "fog" / "5" / rel)
        want = pil_reference(im, name)
        assert torch.equal(x[k], want), f"{name} {rel}: max |diff| {(x[k] - want).abs().max().item()}"
        if name != "timm":
            assert torch.equal(x[k], theirs(im))


def test_names_and_sizes_are_checked():
    with pytest.raises(DataError, match="unknown preprocessing 'resize'.*res256crop224, crop224, timm"):
        build_preprocess("resize")
    with pytest.raises(DataError, match="--preprocess timm needs the model's data config"):
        build_preprocess("timm")
    pre = build_preprocess("res256crop224")
    check_input_size(pre, 224)
    with pytest.raises(DataError, match="makes 224-px images but vit_base_patch16_384 takes 384-px"):
        check_input_size(pre, 384, "vit_base_patch16_384")
    assert build_preprocess("timm", {"input_size": (3, 384, 384), "crop_pct": 1.0}).output_size == 384
    assert pre.as_dict()["name"] == "res256crop224" and "Resize(256" in pre.as_dict()["pipeline"]


def test_tree_writer_makes_real_jpegs(tmp_path):
    root = write_imagenet_c_tree(tmp_path, ["n01440764/a.JPEG"], corruptions=("fog",))
    with Image.open(root / "fog" / "5" / "n01440764" / "a.JPEG") as im:
        assert im.format == "JPEG" and im.size == (64, 48)
