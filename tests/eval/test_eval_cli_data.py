"""imse-eval on data as researchers keep it, end to end at CI size through `main()`: CIFAR-10-C / CIFAR-100-C `.npy`
files with a 32-px ViT checkpoint, ImageNet-C's 5,000-image subset with the res256crop224 pipeline, each new
option reaching what runs and the results file, the results written as each method finishes, and a rerun from
results.json repeating the data choices."""
import json

import numpy as np
import pytest
import timm
import torch
from eval_files import write_cifar_c, write_hub_cache, write_imagenet_c_tree, write_safetensors
from helpers import run_cli

from imse_kernels.eval import runner
from imse_kernels.eval.__main__ import main
from imse_kernels.eval.errors import DataError
from imse_kernels.eval.imagenet_c import ImageNetC, subset_5000
from imse_kernels.eval.models import build_timm_model
from imse_kernels.eval.preprocess import build_preprocess

FAST = ["--no-progress", "--no-plot", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    torch.manual_seed(0)
    f = {"root": root}
    vit32 = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    f["vit32"] = str(write_safetensors(vit32, root / "vit32.safetensors"))
    vit224 = timm.create_model("test_vit", pretrained=False, img_size=224)
    f["vit224"] = str(write_safetensors(vit224, root / "vit224.safetensors"))
    write_cifar_c(root / "cifar" / "CIFAR-10-C", corruptions=("gaussian_noise", "fog", "speckle_noise"), n=24)
    write_cifar_c(root / "c100", corruptions=("fog",), n=12, num_classes=100)
    f["rels"] = subset_5000()[:12]
    f["inc"] = write_imagenet_c_tree(root / "inc", f["rels"], corruptions=("gaussian_noise", "fog", "saturate"),
                                     size=(40, 30))
    return f


def cifar_args(files, out, *more):
    return ["--data", "cifar10-c", "--data-dir", str(files["root"] / "cifar"), "--model", "test_vit", "--img-size",
            "32", "--patch-size", "4", "--num-classes", "10", "--checkpoint", files["vit32"], "--output-dir",
            str(out), *FAST, *more]


def inc_args(files, out, *more):
    return ["--data", "imagenet-c", "--data-dir", str(files["inc"]), "--model", "test_vit", "--img-size", "224",
            "--checkpoint", files["vit224"], "--max-per-domain", "12", "--batch-size", "4", "--output-dir", str(out),
            *FAST, *more]


@torch.no_grad()
def _source_correct_cifar(files, corruption, severity, n):
    """Source's correct count computed without the harness: the .npy block, /255, the folded model."""
    model = build_timm_model("test_vit", files["vit32"], num_classes=10, img_size=32, patch_size=4).model
    x = np.load(files["root"] / "cifar" / "CIFAR-10-C" / f"{corruption}.npy")[(severity - 1) * 24:][:n]
    y = np.load(files["root"] / "cifar" / "CIFAR-10-C" / "labels.npy")[(severity - 1) * 24:][:n]
    logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    return int((logits.argmax(1).numpy() == y).sum())


def test_cifar10c_run_end_to_end_and_its_rerun(files, tmp_path, capsys):
    out = tmp_path / "c10"
    rc, stdout, err = run_cli(cifar_args(files, out, "--corruptions", "gaussian_noise,fog", "--method", "source,imse",
                                         "--batch-size", "8", "--max-per-domain", "16", "--severity", "3"), capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    p = res["meta"]["protocol"]
    assert p["data"] == "cifar10-c" and p["images_per_domain"] == 16 and p["reports"] == "error"
    assert p["preprocess"] is None and res["meta"]["complete"] is True
    for k, c in enumerate(["gaussian_noise", "fog"]):
        assert res["methods"]["source"]["correct"][k] == _source_correct_cifar(files, c, 3, 16)
    assert res["methods"]["imse"]["total"] == [16, 16]
    assert res["meta"]["model"] == "test_vit" and res["meta"]["num_classes"] == 10
    assert res["meta"]["data_config"]["input_size"] == [3, 32, 32]
    run = res["config"]["run"]
    assert (run["data"], run["img_size"], run["patch_size"], run["max_per_domain"]) == ("cifar10-c", 32, 4, 16)
    assert run["report"] == "error" and run["n_test"] is None and run["preprocess"] is None
    assert "table: error (%)" in stdout and "error (%)" in stdout.split("table: error")[1]
    assert "warning: domains of 16 images are shorter than the shift detector's window" in err
    # the error column is 100 - accuracy
    src = res["methods"]["source"]
    assert f"{100 - 100 * src['accuracy'][1]:.1f}" in [ln.split()[1] for ln in stdout.splitlines()
                                                        if ln.startswith("fog")]
    rerun = ["--config", str(out / "results.json"), "--output-dir", str(tmp_path / "again"), "--no-progress"]
    assert main(rerun) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["config"] == res["config"]
    assert again["methods"]["imse"]["correct"] == res["methods"]["imse"]["correct"]
    assert again["meta"]["protocol"] == res["meta"]["protocol"]


def test_cifar_corruptions_from_disk_and_cifar100(files, tmp_path, capsys):
    """`all` means every .npy present (the extra speckle_noise included, in the published order); CIFAR-100-C
    reads 100 classes; a model at another size gets resized images and the header says so."""
    rc, _, err = run_cli(cifar_args(files, tmp_path / "a", "--corruptions", "all", "--method", "source"), capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["config"]["run"]["corruptions"] == ["gaussian_noise", "fog", "speckle_noise"]
    assert [s["corruption"] for s in res["segments"]] == ["gaussian_noise", "fog", "speckle_noise"]
    assert res["methods"]["source"]["total"] == [24, 24, 24]
    c100 = str(write_safetensors(timm.create_model("test_vit", pretrained=False, num_classes=100, img_size=64),
                                 tmp_path / "c.st"))
    rc, stdout, err = run_cli(["--data", "cifar100-c", "--data-dir", str(files["root"] / "c100"), "--model", "test_vit",
                               "--img-size", "64", "--num-classes", "100", "--checkpoint", c100, "--corruptions", "fog",
                               "--method", "source", "--output-dir", str(tmp_path / "b"), *FAST], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["meta"]["protocol"]["preprocess"]["name"] == "resize64" and "resized to the model's 64 px" in err
    assert res["methods"]["source"]["total"] == [12] and "cifar100-c" in stdout and "preprocess resize64" in stdout


def test_imagenet_c_subset_5000_end_to_end(files, tmp_path, capsys):
    """The CoTTA-lineage protocol: RobustBench's list in its order, the first NUM_EX, res256crop224 by default,
    error reported; Source's counts equal the folded model on images read with torchvision's pipeline; the
    seed does not change the images."""
    rc, stdout, err = run_cli(inc_args(files, tmp_path / "s0", "--corruptions", "gaussian_noise,fog", "--method",
                                       "source,tent", "--seed", "0"), capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "s0" / "results.json").read_text())
    p = res["meta"]["protocol"]
    assert p["subset"] == "RobustBench's 5,000-image list" and p["order"] == "fixed order"
    assert p["preprocess"]["name"] == "res256crop224" and p["reports"] == "error" and p["images_per_domain"] == 12
    assert res["config"]["run"]["subset"] == "5000" and res["config"]["run"]["preprocess"] == "res256crop224"
    assert res["meta"]["image_check"] == {"mode": "header", "checked": 24, "skipped_count": 0, "skipped": []}
    header = ("imagenet-c · RobustBench's 5,000-image list · 12 images per domain (fixed order) · preprocess "
              "res256crop224 · table: error (%)")
    assert header in stdout and "images checked up front (header): 24 files, 0 unreadable skipped" in stdout
    loaded = build_timm_model("test_vit", files["vit224"], img_size=224)
    data = ImageNetC(str(files["inc"]), ["gaussian_noise", "fog"], [5], max_per_domain=12, subset="5000",
                     preprocess=build_preprocess("res256crop224"))
    assert data.relpaths == files["rels"]
    with torch.no_grad():
        for k, c in enumerate(["gaussian_noise", "fog"]):
            correct = sum(int((loaded.model(x).argmax(1) == y).sum()) for x, y in data.domain(c, 5).batches(4))
            assert res["methods"]["source"]["correct"][k] == correct
    rc, _, err = run_cli(inc_args(files, tmp_path / "s1", "--corruptions", "gaussian_noise,fog", "--method", "source",
                                  "--seed", "1"), capsys)
    assert rc == 0, err
    s1 = json.loads((tmp_path / "s1" / "results.json").read_text())
    assert s1["methods"]["source"]["correct"] == res["methods"]["source"]["correct"], "a fixed list, not shuffled"


def test_imagenet_c_options_reach_the_run(files, tmp_path, capsys):
    """--preprocess, --report, --corruptions all (an extra corruption on disk), --image-check decode, --label-map,
    --subset full: each in the results file and in what ran."""
    rc, stdout, err = run_cli(inc_args(files, tmp_path / "a", "--corruptions", "all", "--preprocess", "crop224",
                                       "--report", "accuracy", "--image-check", "decode", "--method", "source"), capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["config"]["run"]["corruptions"] == ["gaussian_noise", "fog", "saturate"]
    assert res["meta"]["preprocess"] == "crop224" and res["meta"]["reports"] == "accuracy"
    assert res["meta"]["image_check"]["mode"] == "decode" and res["meta"]["image_check"]["checked"] == 36
    assert "table: accuracy (%)" in stdout and "preprocess crop224" in stdout
    # a label map: class folders -> outputs of the head
    wnids = sorted({r.split("/")[0] for r in files["rels"]})
    (tmp_path / "map.json").write_text(json.dumps({w: 7 + i for i, w in enumerate(wnids)}))
    rc, _, err = run_cli(inc_args(files, tmp_path / "b", "--corruptions", "fog", "--label-map",
                                  str(tmp_path / "map.json"), "--subset", "full", "--method", "source"), capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["config"]["run"]["label_map"] == str(tmp_path / "map.json") and res["config"]["run"]["subset"] == "full"
    assert res["meta"]["protocol"]["order"] == "shuffled by seed 0"


def test_skip_unreadable_is_counted_and_recorded(files, tmp_path, capsys):
    root = write_imagenet_c_tree(tmp_path / "inc", files["rels"][:6], corruptions=("fog", "snow"), size=(40, 30))
    (root / "snow" / "5" / files["rels"][4]).write_text("not a jpeg")
    args = ["--data", "imagenet-c", "--data-dir", str(root), "--corruptions", "fog,snow", "--max-per-domain", "6",
            "--model", "test_vit", "--img-size", "224", "--checkpoint", files["vit224"], "--method", "source",
            "--batch-size", "4", *FAST]
    rc, _, err = run_cli(args + ["--output-dir", str(tmp_path / "x")], capsys)
    assert rc == 2 and files["rels"][4] in err and "--skip-unreadable" in err
    rc, stdout, err = run_cli(args + ["--skip-unreadable", "--output-dir", str(tmp_path / "y")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "y" / "results.json").read_text())
    check = res["meta"]["image_check"]
    assert check["skipped_count"] == 1 and files["rels"][4] in check["skipped"][0]
    assert res["methods"]["source"]["total"] == [5, 5], "left out of every domain"
    assert res["config"]["run"]["skip_unreadable"] is True and "1 unreadable skipped" in stdout


def test_hf_hub_model_from_the_local_cache_without_checkpoint(files, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"architecture": "test_vit", "num_classes": 10, "model_args": {"img_size": 32, "patch_size": 4},
           "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                              "interpolation": "bicubic"}}
    write_hub_cache(tmp_path / "hub", "someone/vit32-digits", {
        "config.json": lambda p: p.write_text(json.dumps(cfg)),
        "model.safetensors": lambda p: p.write_bytes(open(files["vit32"], "rb").read())})
    rc, _, err = run_cli(["--data", "cifar10-c", "--data-dir", str(files["root"] / "cifar"), "--model",
                          "hf-hub:someone/vit32-digits", "--corruptions", "fog", "--method", "source",
                          "--output-dir", str(tmp_path / "o"), *FAST], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["meta"]["checkpoint"].endswith("model.safetensors") and res["meta"]["num_classes"] == 10
    assert res["provenance"]["checkpoint_sha256"] is not None


def test_results_are_written_as_each_method_finishes(files, tmp_path, capsys, monkeypatch):
    """A method failing after others finished leaves their results on disk (results.json and .csv, marked
    incomplete); a data error then says where they are, in its one line; a bug still shows its traceback."""
    real = runner.run_method

    def failing(kind):
        def run_method(name, *a, **k):
            if name == "imse":
                raise kind(*(("/data/x.JPEG", "cannot read image", "replace the file") if kind is DataError
                             else ("a bug",)))
            return real(name, *a, **k)
        return run_method

    out = tmp_path / "a"
    monkeypatch.setattr(runner, "run_method", failing(DataError))
    rc, _, err = run_cli(cifar_args(files, out, "--corruptions", "fog,gaussian_noise", "--method", "source,tent,imse"),
                         capsys)
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("imse-eval: error: /data/x.JPEG: cannot read image; replace the file; the finished "
                           "methods' results (source, tent) are in ") and str(out / "results.json") in line
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["source", "tent"] and res["meta"]["complete"] is False
    assert res["methods"]["source"]["correct"][0] == _source_correct_cifar(files, "fog", 5, 24)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 and {r.split(",")[0] for r in rows[1:]} == {"source", "tent"}
    monkeypatch.setattr(runner, "run_method", failing(RuntimeError))
    with pytest.raises(RuntimeError, match="a bug"):
        main(cifar_args(files, tmp_path / "b", "--corruptions", "fog", "--method", "source,imse"))
    assert list(json.loads((tmp_path / "b" / "results.json").read_text())["methods"]) == ["source"]


def test_results_of_several_seeds_are_written_as_they_finish(files, tmp_path, capsys, monkeypatch):
    real = runner.run_method
    calls = []

    def run_method(name, *a, **k):
        calls.append(name)
        if len(calls) == 3:  # seed 1's first method
            raise RuntimeError("stop")
        return real(name, *a, **k)

    monkeypatch.setattr(runner, "run_method", run_method)
    with pytest.raises(RuntimeError, match="stop"):
        main(cifar_args(files, tmp_path / "a", "--corruptions", "fog", "--method", "source,tent", "--seeds", "0,1"))
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [0] and list(res["runs"][0]["methods"]) == ["source", "tent"]
    assert res["aggregate"] is None and res["meta"]["complete"] is False
