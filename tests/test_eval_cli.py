"""imse-eval end to end at CI size, through `main()` (the console script's code path)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imse_kernels.eval.__main__ import main
from imse_kernels.eval.metrics import shift_detection

CI = ["--train-steps", "40", "--n-test", "64", "--batch-size", "32", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    pytest.importorskip("sklearn")  # the embedded data set
    return str(tmp_path_factory.mktemp("imse_cache"))


def _run(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _source_accuracy(cache, corruption, severity, seed):
    """What the Source column must say, computed without the harness."""
    from imse_kernels.eval.corruptions import corrupt
    from imse_kernels.eval.digits import CONTENT_SCALE, Split, load_splits
    from imse_kernels.eval.models import EmbeddedConfig, accuracy, load_or_train_embedded

    cfg = EmbeddedConfig(steps=40, n_test=64)
    train, test = load_splits(n_test=64, seed=cfg.seed)
    model, info = load_or_train_embedded(cfg, train, test, cache, log=lambda s: None)
    assert not info["trained_now"], "the harness should have trained and cached this model already"
    return accuracy(model, Split(corrupt(test.images, corruption, severity, seed, CONTENT_SCALE), test.labels))


def test_digits_continual_all_methods(tmp_path, cache, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(CI + ["--corruptions", "gaussian_noise,contrast", "--cache-dir", cache,
                                 "--output-dir", str(out), "--seed", "3"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    methods = ["source", "tent", "imse", "imse-mix", "imse-nodiv"]
    assert list(res["methods"]) == methods and res["meta"]["setting"] == "continual"
    assert [s["corruption"] for s in res["segments"]] == ["gaussian_noise", "contrast"]
    assert res["meta"]["true_boundaries"] == [2]
    for name, r in res["methods"].items():
        assert r["total"] == [64, 64] and r["batches"] == [2, 2], name
        assert all(0 <= a <= 1 for a in r["accuracy"]) and r["images_per_s"] > 0
        assert r["mean_accuracy"] == pytest.approx(sum(r["accuracy"]) / 2)
    for k, c in enumerate(["gaussian_noise", "contrast"]):
        assert res["methods"]["source"]["accuracy"][k] == pytest.approx(_source_accuracy(cache, c, 5, 3))
    assert res["methods"]["source"]["shift_detection"] is None
    det = res["methods"]["imse"]["shift_detection"]
    assert det["boundaries"] == [2] and det["recall"] == 1.0, "noise -> contrast is a large shift"
    assert det == shift_detection(det["detected"], [2], 2) | {"matched": [list(m) for m in det["matched"]]}
    kinds = {e["kind"] for e in res["methods"]["imse-mix"]["events"]}
    assert {"source", "shift", "retrieve"} <= kinds
    # CSV rows agree with the JSON.
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 10
    for row in rows:
        assert int(row["correct"]) == res["methods"][row["method"]]["correct"][int(row["segment"])]
    for name in methods:
        assert name in stdout
    assert "mean accuracy (%)" in stdout and "shift recall" in stdout and "images/s" in stdout
    try:
        import matplotlib  # noqa: F401

        assert (out / "accuracy.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in stdout and not (out / "accuracy.png").exists()


def test_reset_and_recurring_settings_and_determinism(tmp_path, cache, capsys):
    base = CI + ["--corruptions", "fog,impulse_noise", "--cache-dir", cache, "--method", "source,imse", "--no-plot"]
    rc, _, err = _run(base + ["--setting", "reset_each_shift", "--output-dir", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["methods"]["imse"]["shift_detection"] is None
    assert not [e for e in res["methods"]["imse"]["events"] if e["kind"] == "shift"], "reset before every domain"

    rc, _, err = _run(base + ["--setting", "recurring", "--rounds", "2", "--output-dir", str(tmp_path / "b")], capsys)
    assert rc == 0, err
    rec = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [s["label"] for s in rec["segments"]] == ["r1:fog", "r1:impulse_noise", "r2:fog", "r2:impulse_noise"]
    assert rec["meta"]["imse_lr"] == 3e-3 and rec["meta"]["true_boundaries"] == [2, 4, 6]
    src = rec["methods"]["source"]["correct"]
    assert src[:2] == src[2:], "the same images in both rounds"

    rc, _, err = _run(base + ["--setting", "recurring", "--rounds", "2", "--output-dir", str(tmp_path / "c")], capsys)
    again = json.loads((tmp_path / "c" / "results.json").read_text())
    assert again["methods"]["imse"]["correct"] == rec["methods"]["imse"]["correct"]
    assert again["methods"]["imse"]["events"] == rec["methods"]["imse"]["events"], "same seed, same run"


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    rc, _, err = _run(["--data", "imagenet-c", "--no-progress"], capsys)
    assert rc == 2 and "needs --data-dir" in err
    rc, _, err = _run(["--data", "imagenet-c", "--data-dir", str(tmp_path / "nowhere"), "--no-progress"], capsys)
    assert rc == 2 and "ImageNet-C directory not found" in err and "nowhere" in err
    (tmp_path / "inc" / "fog" / "5").mkdir(parents=True)
    rc, _, err = _run(["--data", "imagenet-c", "--data-dir", str(tmp_path / "inc"), "--model", "test_vit",
                       "--checkpoint", str(tmp_path / "missing.safetensors"), "--corruptions", "fog", "--no-progress"],
                      capsys)
    assert rc == 2 and "checkpoint file not found" in err and "missing.safetensors" in err
    rc, _, err = _run(["--method", "source,bogus", "--no-progress"], capsys)
    assert rc == 2 and "unknown method" in err


def test_imagenet_c_folder_run_with_a_local_timm_checkpoint(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "test_vit.safetensors"))
    rng = np.random.default_rng(0)
    for dom in ("gaussian_noise/5", "fog/5", "clean/x"):
        for cls in ("n01440764", "n01443537"):
            d = tmp_path / "inc" / dom / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "out"
    rc, stdout, err = _run(["--data", "imagenet-c", "--data-dir", str(tmp_path / "inc"), "--corruptions",
                            "gaussian_noise,fog", "--model", "test_vit", "--checkpoint",
                            str(tmp_path / "test_vit.safetensors"), "--source-dir", str(tmp_path / "inc" / "clean" / "x"),
                            "--method", "source,imse", "--batch-size", "4", "--output-dir", str(out), "--no-progress",
                            "--no-plot", "--threads", "1"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["data_config"]["input_size"] == [3, 160, 160]
    assert res["methods"]["imse"]["total"] == [6, 6] and res["methods"]["imse"]["batches"] == [2, 2]
    # Source's accuracy is the folded model's on the loaded images, labels 0 and 1 from the WordNet ids.
    from imse_kernels.eval.imagenet_c import ImageNetC
    from imse_kernels.eval.models import load_timm_model

    m, cfg = load_timm_model("test_vit", str(tmp_path / "test_vit.safetensors"))
    data = ImageNetC(str(tmp_path / "inc"), ["gaussian_noise"], [5], 160, cfg["crop_pct"], cfg["interpolation"], seed=0)
    with torch.no_grad():
        correct = sum(int((m(x).argmax(1) == y).sum()) for x, y in data.domain("gaussian_noise", 5).batches(4))
    assert res["methods"]["source"]["correct"][0] == correct
    assert "source" in stdout and "imse" in stdout


def test_multi_stream_setting_equals_separate_adapters(tmp_path, cache, capsys):
    """--setting multi_stream: K streams in mixed batches through MultiStreamIMSE give the accuracy of K
    separate IMSE adapters (the adapter's contract), per stream, with each one's throughput."""
    out = tmp_path / "ms"
    rc, text, err = _run(CI + ["--cache-dir", cache, "--setting", "multi_stream", "--streams", "3", "--batch-size",
                               "16", "--corruptions", "gaussian_noise,fog,pixelate", "--output-dir", str(out)], capsys)
    assert rc == 0, err
    data = json.loads((out / "results.json").read_text())
    multi, sep = data["methods"]["multi_stream"], data["methods"]["separate"]
    assert multi["correct"] == sep["correct"] and len(multi["accuracy"]) == 3
    assert all(t == 3 * 64 for t in multi["total"])  # every stream sees every domain once
    assert multi["max_logit_diff"] < 1e-3
    assert sorted(map(sorted, data["orders"])) == [sorted(["gaussian_noise", "fog", "pixelate"])] * 3
    assert "multi_stream" in text and "separate" in text and "img/s" in text
