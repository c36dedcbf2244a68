"""Data for imse-eval: the ImageNet-C folder loader on a tree the test writes, the digits split, the streams."""
import numpy as np
import pytest
import torch
from PIL import Image

from imse_kernels.eval.errors import DataError
from imse_kernels.eval.imagenet_c import ImageNetC, class_index
from imse_kernels.eval.streams import Segment, build_stream, true_boundaries

WNIDS = ("n01440764", "n15075141")  # ImageNet classes 0 and 999


def _write_tree(root, corruptions=("gaussian_noise", "fog"), severities=(5,), classes=WNIDS, per_class=3, size=40):
    rng = np.random.default_rng(0)
    for c in corruptions:
        for s in severities:
            for k, cls in enumerate(classes):
                d = root / c / str(s) / cls
                d.mkdir(parents=True)
                for i in range(per_class):
                    # class k is bright in channel k: the label can be read back from the pixels
                    img = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                    img[..., k % 3] = 200 + i
                    Image.fromarray(img).save(d / f"img_{i}.png")
    return root


def test_imagenet_c_folders_load_with_imagenet_labels(tmp_path):
    root = _write_tree(tmp_path / "inc")
    data = ImageNetC(str(root), ["gaussian_noise", "fog"], [5], input_size=32, crop_pct=1.0, seed=0)
    assert data.classes == {"n01440764": 0, "n15075141": 999}
    a, b = data.domain("gaussian_noise", 5), data.domain("fog", 5)
    assert len(a) == len(b) == 6 and a.relpaths == b.relpaths
    xs, ys = zip(*a.batches(4))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert sorted(y.tolist()) == [0, 0, 0, 999, 999, 999]
    bright = x.mean(dim=(2, 3)).argmax(1)  # channel 0 for class 0, channel 1 for class 999
    assert torch.equal(bright, (y == 999).long())
    assert y.tolist() != sorted(y.tolist()) or y.tolist() != sorted(y.tolist(), reverse=True), "order is shuffled"


def test_imagenet_c_subset_and_seed(tmp_path):
    root = _write_tree(tmp_path / "inc")
    d0 = ImageNetC(str(root), ["fog"], [5], 32, max_per_domain=4, seed=0)
    d0b = ImageNetC(str(root), ["fog"], [5], 32, max_per_domain=4, seed=0)
    assert len(d0.domain("fog", 5)) == 4 and d0.relpaths == d0b.relpaths
    orders = {tuple(ImageNetC(str(root), ["fog"], [5], 32, seed=s).relpaths) for s in range(6)}
    assert len(orders) > 1


def test_non_wordnet_folders_use_sorted_names(tmp_path):
    assert class_index(["cat", "ant", "bee"]) == {"ant": 0, "bee": 1, "cat": 2}
    root = _write_tree(tmp_path / "inc", corruptions=("fog",), classes=("zebra", "apple"))
    assert ImageNetC(str(root), ["fog"], [5], 32).classes == {"apple": 0, "zebra": 1}


def test_imagenet_c_missing_things_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="ImageNet-C directory not found"):
        ImageNetC(str(tmp_path / "absent"), ["fog"], [5], 32)
    with pytest.raises(DataError, match="needs --data-dir"):
        ImageNetC("", ["fog"], [5], 32)
    root = _write_tree(tmp_path / "inc", corruptions=("fog",))
    with pytest.raises(DataError, match="lacks domain folder.*contrast/5.*corruptions present: fog"):
        ImageNetC(str(root), ["fog", "contrast"], [5], 32)
    (root / "fog" / "3").mkdir()
    with pytest.raises(DataError, match="fog/3: no images here"):
        ImageNetC(str(root), ["fog"], [3], 32)


def test_digits_split_is_stratified_disjoint_and_fixed():
    pytest.importorskip("sklearn")
    from imse_kernels.eval.digits import load_splits

    train, test = load_splits(n_test=200, seed=0)
    train2, test2 = load_splits(n_test=200, seed=0)
    assert len(test) == 200 and len(train) == 1797 - 200
    assert torch.equal(test.images, test2.images) and torch.equal(test.labels, test2.labels)
    assert test.images.shape[1:] == (3, 32, 32) and 0 <= test.images.min() and test.images.max() <= 1
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 23
    flat_tr = {tuple(v) for v in train.images[:, 0, ::4, ::4].reshape(len(train), -1).tolist()}
    overlap = sum(tuple(v) in flat_tr for v in test.images[:, 0, ::4, ::4].reshape(len(test), -1).tolist())
    assert overlap <= 2  # the digits set holds a handful of exact duplicates, no more
    assert test.labels[:20].tolist() != sorted(test.labels[:20].tolist())


def test_streams_of_each_setting():
    cs = ["gaussian_noise", "fog", "contrast"]
    cont = build_stream("continual", cs, 5)
    assert [s.corruption for s in cont.segments] == cs and not cont.resets_at_boundaries
    assert build_stream("reset_each_shift", cs, 5).resets_at_boundaries
    rec = build_stream("recurring", cs, 3, rounds=2)
    assert [(s.round, s.corruption) for s in rec.segments] == [(r, c) for r in range(2) for c in cs]
    assert rec.segments[3].label("recurring") == "r2:gaussian_noise"
    grad = build_stream("gradual", cs[:2], 3, domain_size=256, batch_size=64)
    assert [s.severity for s in grad.segments] == [1, 2, 3, 2, 1] * 2
    assert all(s.count == 64 for s in grad.segments) and len({s.start for s in grad.segments[:4]}) == 4
    with pytest.raises(ValueError, match="unknown setting"):
        build_stream("episodic", cs, 5)


def test_true_boundaries_are_domain_changes():
    segs = [Segment("fog", 5), Segment("fog", 5, 1), Segment("contrast", 5), Segment("fog", 4)]
    assert true_boundaries([3, 3, 2, 4], segs) == [6, 8]


@pytest.mark.parametrize("workers", [0, 2])
def test_imagenet_c_images_by_index(tmp_path, workers):
    """`get(indices)`: the images and labels `batches` gives, picked by index, in the asked order (the mixed
    and correlated settings read images one by one, from several domains per batch)."""
    root = _write_tree(tmp_path / "inc")
    data = ImageNetC(str(root), ["gaussian_noise", "fog"], [5], input_size=32, crop_pct=1.0, seed=1, workers=workers)
    dom = data.domain("fog", 5)
    xs, ys = zip(*dom.batches(6))
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    assert dom.labels == y_all.tolist() == data.labels
    x, y = dom.get([4, 0, 4, 5])
    assert torch.equal(x, x_all[[4, 0, 4, 5]]) and y.tolist() == y_all[[4, 0, 4, 5]].tolist()
    assert y.dtype == torch.long
    with pytest.raises(IndexError):
        dom.get([6])
