"""CIFAR-10-C / CIFAR-100-C reader on small generated `.npy` files in RobustBench's layout."""
import pickle

import numpy as np
import pytest
import torch
from eval_files import write_cifar_c

from imse_kernels.eval.cifar_c import CifarC
from imse_kernels.eval.errors import DataError


def robustbench_load(root, n_examples, severity, corruption):
    """RobustBench's load_corruptions_cifar for one corruption, shuffle=False (data.py), re-written here; its
    n_total_cifar = 10000 is the generated files' N."""
    labels = np.load(root / "labels.npy")
    images_all = np.load(root / f"{corruption}.npy")
    n_total = len(images_all) // 5
    images = images_all[(severity - 1) * n_total:severity * n_total]
    x = np.transpose(images[:n_examples], (0, 3, 1, 2)).astype(np.float32) / 255
    return torch.tensor(x), torch.tensor(labels[:n_examples])


@pytest.mark.parametrize("labels_repeat", [True, False])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_domains_match_robustbenchs_slicing(tmp_path, severity, labels_repeat):
    arrays, labels = write_cifar_c(tmp_path, n=20, labels_repeat=labels_repeat)
    data = CifarC(tmp_path, "cifar10-c", ["fog"], [severity], n_examples=7)
    dom = data.domain("fog", severity)
    x, y = next(dom.batches(64))
    want_x, want_y = robustbench_load(tmp_path, 7, severity, "fog")
    assert torch.equal(x, want_x) and torch.equal(y, want_y.long())
    assert x.dtype == torch.float32 and x.shape == (7, 3, 32, 32)
    assert (x[:, 0, 0, 0] * 255).round().long().tolist() == [severity] * 7, "the severity's block"
    assert (x[:, 1, 0, 0] * 255).round().long().tolist() == list(range(7)), "file order"
    assert dom.labels == labels[:7].tolist() == data.labels


def test_every_image_by_default_batches_and_indices(tmp_path):
    arrays, labels = write_cifar_c(tmp_path, n=20)
    data = CifarC(tmp_path, "cifar10-c", "all", [5])
    dom = data.domain("gaussian_noise", 5)
    assert len(dom) == 20 and data.n_examples == 20
    assert isinstance(dom.images, np.memmap) or isinstance(dom.images.base, np.memmap), "memory-mapped"
    xs, ys = zip(*dom.batches(6, start=15, count=10))
    assert [len(x) for x in xs] == [6, 4]
    order = [(15 + k) % 20 for k in range(10)]
    assert (torch.cat(xs)[:, 1, 0, 0] * 255).round().long().tolist() == order
    assert torch.cat(ys).tolist() == labels[order].tolist()
    x, y = dom.get([19, 0, 19])
    assert (x[:, 1, 0, 0] * 255).round().long().tolist() == [19, 0, 19] and y.dtype == torch.long
    with pytest.raises(IndexError):
        dom.get([20])


def test_robustbench_parent_folder_corruptions_from_disk_and_resizing(tmp_path):
    write_cifar_c(tmp_path / "CIFAR-100-C", corruptions=("fog", "saturate", "gaussian_noise", "my_noise"),
                  n=10, num_classes=100)
    data = CifarC(tmp_path, "cifar100-c", "all", [2], size=64)
    assert data.root == tmp_path / "CIFAR-100-C" and data.num_classes == 100
    assert data.corruptions == ["gaussian_noise", "fog", "saturate", "my_noise"]
    x, _ = data.domain("saturate", 2).get([0, 1])
    assert x.shape == (2, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    p = data.protocol()
    assert p.data == "cifar100-c" and p.images_per_domain == 10 and p.preprocess is None and p.reports == "error"
    with pytest.raises(DataError, match="no corruption frost here; choose from what is present: gaussian_noise"):
        CifarC(tmp_path, "cifar100-c", "frost", [2])


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_bad_files_are_one_line_errors_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    write_cifar_c(tmp_path, corruptions=("fog",), n=10)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "labels.npy", np.zeros(50, np.int64))
    cases = {
        "noch.npy": (np.zeros((50, 32, 32), np.uint8), "expected (5·N, H, W, 3) images, got shape (50, 32, 32)"),
        "float.npy": (np.zeros((50, 32, 32, 3), np.float32), "expected uint8 pixels, got float32"),
        "odd.npy": (np.zeros((52, 32, 32, 3), np.uint8), "holds 52 images, not 5 equal severity blocks"),
        "short.npy": (np.zeros((25, 32, 32, 3), np.uint8), "holds 50 labels, but short.npy holds 5·5 images"),
    }
    for name, (arr, text) in cases.items():
        np.save(bad / name, arr)
        with pytest.raises(DataError) as err:
            CifarC(bad, "cifar10-c", name[:-4], [5])
        assert text in _one_line(err), name
    # an object array: refused without unpickling what it holds
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(bad / "objects.npy", "wb") as f:
        np.lib.format.write_array(f, np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as err:
        CifarC(bad, "cifar10-c", "objects", [5])
    assert "holds Python objects" in _one_line(err) and not marker.exists()
    # a truncated download
    full = (tmp_path / "fog.npy").read_bytes()
    (bad / "cut.npy").write_bytes(full[: len(full) // 3])
    with pytest.raises(DataError) as err:
        CifarC(bad, "cifar10-c", "cut", [5])
    assert _one_line(err).startswith(str(bad / "cut.npy")) and "truncated .npy file" in str(err.value)
    (bad / "text.npy").write_text("not numpy")
    with pytest.raises(DataError, match="text.npy: not a .npy array"):
        CifarC(bad, "cifar10-c", "text", [5])


def test_labels_and_options_are_checked(tmp_path):
    write_cifar_c(tmp_path / "a", corruptions=("fog",), n=10)
    (tmp_path / "a" / "labels.npy").unlink()
    with pytest.raises(DataError, match="labels.npy: labels.npy missing; copy labels.npy"):
        CifarC(tmp_path / "a", "cifar10-c", "all", [5])
    write_cifar_c(tmp_path / "b", corruptions=("fog",), n=10, num_classes=100)
    np.save(tmp_path / "b" / "labels.npy", np.arange(50) % 100)
    with pytest.raises(DataError, match=r"labels run 0\.\.49, outside 0\.\.9 for cifar10-c; check --data"):
        CifarC(tmp_path / "b", "cifar10-c", "all", [5])
    np.save(tmp_path / "b" / "labels.npy", np.zeros((50, 1), np.int64))
    with pytest.raises(DataError, match="labels must be a 1-D integer array"):
        CifarC(tmp_path / "b", "cifar10-c", "all", [5])
    np.save(tmp_path / "b" / "labels.npy", np.zeros(30, np.int64))
    with pytest.raises(DataError, match="holds 30 labels, but fog.npy holds 5·10 images"):
        CifarC(tmp_path / "b", "cifar10-c", "all", [5])
    write_cifar_c(tmp_path / "c", corruptions=("fog",), n=10)
    for bad in (0, -3):
        with pytest.raises(DataError, match=f"--max-per-domain must be a positive number of images, got {bad}"):
            CifarC(tmp_path / "c", "cifar10-c", "all", [5], n_examples=bad)
    with pytest.raises(DataError, match="--max-per-domain 11 is more than the 10 images per domain"):
        CifarC(tmp_path / "c", "cifar10-c", "all", [5], n_examples=11)
    with pytest.raises(DataError, match="severity must be 1..5, got 6"):
        CifarC(tmp_path / "c", "cifar10-c", "all", [6])
    with pytest.raises(DataError, match="CIFAR-10-C directory not found"):
        CifarC(tmp_path / "none", "cifar10-c")
    with pytest.raises(DataError, match="--data cifar10-c needs --data-dir"):
        CifarC("", "cifar10-c")
    with pytest.raises(DataError, match="unknown data set 'cifar-10-c'"):
        CifarC(tmp_path / "c", "cifar-10-c")


def test_pickle_module_is_not_needed(tmp_path):
    """The reader never asks numpy to unpickle (allow_pickle=False), so np.load's pickle path is unreachable."""
    write_cifar_c(tmp_path, corruptions=("fog",), n=5)
    calls = []
    real = pickle.loads
    try:
        pickle.loads = lambda *a, **k: calls.append(a) or real(*a, **k)
        x, _ = next(CifarC(tmp_path, "cifar10-c", "all", [1]).domain("fog", 1).batches(5))
    finally:
        pickle.loads = real
    assert x.shape == (5, 3, 32, 32) and calls == []
