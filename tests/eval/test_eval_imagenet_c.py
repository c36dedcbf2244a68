"""ImageNet-C protocols on generated trees: RobustBench's 5,000-image list in order, corruptions from disk,
images checked up front, label maps, and one-line errors for every bad file."""
import hashlib
import json

import pytest
import torch
from eval_files import write_imagenet_c_tree, write_jpeg

from imse_kernels.eval.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    KNOWN_CORRUPTIONS,
    corruption_order,
    select_corruptions,
)
from imse_kernels.eval.errors import DataError
from imse_kernels.eval.imagenet_c import _SUBSET_5000_FILE, SUBSET_5000_SHA256, ImageNetC, subset_5000
from imse_kernels.eval.images import imagenet_wnids, load_label_map


def test_the_shipped_list_is_robustbenchs():
    assert hashlib.sha256(_SUBSET_5000_FILE.read_bytes()).hexdigest() == SUBSET_5000_SHA256
    ids = subset_5000()
    assert len(ids) == len(set(ids)) == 5000
    assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG" and ids[-1] == "n13133613/ILSVRC2012_val_00025432.JPEG"
    assert len({r.split("/")[0] for r in ids}) == 997 and set(r.split("/")[0] for r in ids) <= set(imagenet_wnids())
    # RobustBench labels a full tree by its sorted folder names; timm's wnid order is that same order
    assert imagenet_wnids() == sorted(imagenet_wnids())


def test_subset_5000_keeps_the_list_order_and_takes_the_first_n(tmp_path):
    listed = subset_5000()[:12]
    extra = ["n01440764/ILSVRC2012_val_99999999.JPEG"]  # on disk but not in the list: never read
    root = write_imagenet_c_tree(tmp_path / "inc", listed + extra)
    orders = set()
    for seed in (0, 1, 2):
        data = ImageNetC(str(root), "all", [5], subset="5000", max_per_domain=12, seed=seed,
                         preprocess="res256crop224")
        orders.add(tuple(data.relpaths))
    assert orders == {tuple(listed)}, "fixed order: the seed does not change it"
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    assert data.labels == [wnid_index[r.split("/")[0]] for r in listed]
    first5 = ImageNetC(str(root), ["fog"], [5], subset="5000", max_per_domain=5, preprocess="crop224")
    assert first5.relpaths == listed[:5]
    x, y = first5.domain("fog", 5).get([0, 4])
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [wnid_index[listed[0][:9]], wnid_index[listed[4][:9]]]
    p = first5.protocol()
    assert p.images_per_domain == 5 and p.order == "fixed order" and p.reports == "error"
    assert p.header() == ("imagenet-c · RobustBench's 5,000-image list · 5 images per domain (fixed order) · "
                          "preprocess crop224 · table: error (%)")
    assert p.score(0.75) == 25.0 and ImageNetC(str(root), ["fog"], [5]).protocol("accuracy").score(0.75) == 75.0


def test_subset_5000_on_a_partial_tree_names_what_is_missing(tmp_path):
    root = write_imagenet_c_tree(tmp_path / "inc", subset_5000()[:3], corruptions=("fog",))
    with pytest.raises(DataError, match=r"fog/5: lacks 4997 of the 5000 listed images, e.g. .*--subset full"):
        ImageNetC(str(root), ["fog"], [5], subset="5000")
    with pytest.raises(DataError, match="more than the subset's 5000"):
        ImageNetC(str(root), ["fog"], [5], subset="5000", max_per_domain=5001)
    with pytest.raises(DataError, match="unknown ImageNet-C subset"):
        ImageNetC(str(root), ["fog"], [5], subset="5k")


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_max_per_domain_must_be_positive(tmp_path, bad):
    root = write_imagenet_c_tree(tmp_path / "inc", ["n01440764/a.JPEG"], corruptions=("fog",))
    with pytest.raises(DataError, match=f"--max-per-domain must be a positive number of images, got {bad}"):
        ImageNetC(str(root), ["fog"], [5], max_per_domain=bad)


def test_corruptions_come_from_disk_in_the_published_order(tmp_path):
    rel = ["n01440764/a.JPEG"]
    root = write_imagenet_c_tree(tmp_path / "inc", rel, corruptions=("my_blur", "spatter", "fog", "gaussian_noise"))
    write_imagenet_c_tree(tmp_path / "inc", rel, corruptions=("contrast",), severities=(3,))  # not at severity 5
    data = ImageNetC(str(root), "all", [5])
    assert data.corruptions == ["gaussian_noise", "fog", "spatter", "my_blur"]
    assert ImageNetC(str(root), "spatter,my_blur", [5]).corruptions == ["spatter", "my_blur"]
    assert set(EXTRA_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert corruption_order(["zzz", "saturate", "fog", "gaussian_noise"]) == ["gaussian_noise", "fog", "saturate",
                                                                              "zzz"]
    assert KNOWN_CORRUPTIONS == CORRUPTIONS + EXTRA_CORRUPTIONS and len(KNOWN_CORRUPTIONS) == 19
    with pytest.raises(DataError, match="no corruption hail here; choose from what is present: fog"):
        select_corruptions("hail", ["fog"], "DIR")
    with pytest.raises(DataError, match="DIR: no corruption found"):
        select_corruptions("all", [], "DIR")


def test_unreadable_images_are_found_up_front_named_and_skippable(tmp_path):
    rels = [f"n01440764/img_{i}.JPEG" for i in range(4)]
    root = write_imagenet_c_tree(tmp_path / "inc", rels, corruptions=("gaussian_noise", "fog"))
    jpeg = root / "fog" / "5" / rels[1]
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])        # a truncated download
    (root / "gaussian_noise" / "5" / rels[2]).write_text("404 Not Found\n")  # a text file named .JPEG
    data = ImageNetC(str(root), "all", [5], subset="full", preprocess="crop224")
    with pytest.raises(DataError) as err:
        data.check_images()
    msg = str(err.value)
    assert "\n" not in msg and "--skip-unreadable" in msg
    assert msg.startswith(str(root / "gaussian_noise" / "5" / rels[2])) and "a text file, not an image" in msg
    assert "(and 0 more" not in msg
    report = data.check_images(skip_unreadable=True)
    assert report["checked"] == 8 and len(report["skipped"]) == 2
    assert any("truncated JPEG" in s for s in report["skipped"]) and any("text file" in s for s in report["skipped"])
    assert sorted(data.relpaths) == [rels[0], rels[3]]
    for c in data.corruptions:  # both domains keep the same, readable images
        x, y = data.domain(c, 5).get([0, 1])
        assert x.shape == (2, 3, 224, 224)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_met_while_running_is_one_line_naming_it(tmp_path, workers):
    rels = [f"n01440764/img_{i}.JPEG" for i in range(5)]
    root = write_imagenet_c_tree(tmp_path / "inc", rels, corruptions=("fog",))
    bad = root / "fog" / "5" / rels[3]
    bad.write_bytes(bad.read_bytes()[:300])
    data = ImageNetC(str(root), ["fog"], [5], subset="full", workers=workers, preprocess="crop224")
    with pytest.raises(DataError) as err:
        list(data.domain("fog", 5).batches(2))
    assert str(err.value).startswith(str(bad)) and "\n" not in str(err.value)
    assert "cannot read image" in str(err.value)


def test_label_map_and_the_warning_for_non_wordnet_folders(tmp_path):
    root = write_imagenet_c_tree(tmp_path / "inc", ["tabby/a.JPEG", "beagle/b.JPEG"], corruptions=("fog",))
    data = ImageNetC(str(root), ["fog"], [5])
    assert data.classes == {"beagle": 0, "tabby": 1}
    warning = data.label_warning(1000)
    assert warning and "not ImageNet WordNet ids" in warning and "--label-map" in warning and "\n" not in warning
    assert data.label_warning(10) is None
    (tmp_path / "map.json").write_text(json.dumps({"tabby": 281, "beagle": 162}))
    mapped = ImageNetC(str(root), ["fog"], [5], label_map=load_label_map(tmp_path / "map.json"))
    assert mapped.classes == {"beagle": 162, "tabby": 281} and mapped.label_warning(1000) is None
    (tmp_path / "map.txt").write_text("beagle\ntabby\n")
    assert load_label_map(tmp_path / "map.txt") == {"beagle": 0, "tabby": 1}
    (tmp_path / "short.json").write_text(json.dumps({"tabby": 281}))
    with pytest.raises(DataError, match="label map has no entry for class folder.*beagle"):
        ImageNetC(str(root), ["fog"], [5], label_map=load_label_map(tmp_path / "short.json"))
    (tmp_path / "bad.json").write_text('{"tabby": "cat"}')
    with pytest.raises(DataError, match="bad.json: label of 'tabby' is not a non-negative integer"):
        load_label_map(tmp_path / "bad.json")
    with pytest.raises(DataError, match="label map file not found"):
        load_label_map(tmp_path / "absent.json")
    wnid = write_imagenet_c_tree(tmp_path / "w", ["n01440764/a.JPEG"], corruptions=("fog",))
    assert ImageNetC(str(wnid), ["fog"], [5]).label_warning(1000) is None


def test_a_file_given_as_data_dir(tmp_path):
    f = write_jpeg(tmp_path / "x.JPEG", 10, 10)
    with pytest.raises(DataError, match="x.JPEG: not a directory"):
        ImageNetC(str(f), ["fog"], [5])


def test_batches_wrap_and_prefetch_in_order(tmp_path):
    rels = [f"n01440764/img_{i}.JPEG" for i in range(5)]
    root = write_imagenet_c_tree(tmp_path / "inc", rels, corruptions=("fog",))
    dom = ImageNetC(str(root), ["fog"], [5], preprocess="crop224").domain("fog", 5)
    x_all, _ = dom.get(range(5))
    xs = [x for x, _ in dom.batches(2, start=3, count=7)]
    assert [len(x) for x in xs] == [2, 2, 2, 1]
    assert torch.equal(torch.cat(xs), x_all[[3, 4, 0, 1, 2, 3, 4]])
