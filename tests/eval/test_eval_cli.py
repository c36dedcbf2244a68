"""imse-eval end to end at CI size, through `main()` (the console script's code path)."""
import csv
import hashlib
import json
import statistics

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from imse_kernels.eval.__main__ import main
from imse_kernels.eval.metrics import shift_detection

CI = ["--train-steps", "40", "--n-test", "64", "--batch-size", "32", "--no-progress", "--threads", "1"]


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


def test_digits_continual_all_methods(tmp_path, digits_cache, capsys):
    # Source, Tent and the IMSE variants by name (`--method all` is the baselines' tests' business)
    methods = ["source", "tent", "imse", "imse-mix", "imse-nodiv"]
    out = tmp_path / "out"
    rc, stdout, err = run_cli(CI + ["--corruptions", "gaussian_noise,contrast", "--cache-dir", digits_cache, "--method",
                                    ",".join(methods), "--output-dir", str(out), "--seed", "3"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == methods and res["meta"]["setting"] == "continual"
    assert [s["corruption"] for s in res["segments"]] == ["gaussian_noise", "contrast"]
    assert res["meta"]["true_boundaries"] == [2]
    for name, r in res["methods"].items():
        assert r["total"] == [64, 64] and r["batches"] == [2, 2], name
        assert all(0 <= a <= 1 for a in r["accuracy"]) and r["images_per_s"] > 0
        assert r["mean_accuracy"] == pytest.approx(sum(r["accuracy"]) / 2)
    for k, c in enumerate(["gaussian_noise", "contrast"]):
        assert res["methods"]["source"]["accuracy"][k] == pytest.approx(_source_accuracy(digits_cache, c, 5, 3))
    assert res["methods"]["source"]["shift_detection"] is None
    det = res["methods"]["imse"]["shift_detection"]
    assert det["boundaries"] == [2] and det["recall"] == 1.0, "noise -> contrast is a large shift"
    assert det == shift_detection(det["detected"], [2], 2, 4) | {"matched": [list(m) for m in det["matched"]]}
    assert det["n_batches"] == 4 and det["false_positives_per_100_batches"] == 25.0 * det["false_alarms"]
    assert len(det["delays_batches"]) == len(det["matched"]) and det["median_delay_batches"] is not None
    # what was run
    prov = res["provenance"]
    assert prov["checkpoint"] == res["meta"]["cache"]
    assert prov["checkpoint_sha256"] == hashlib.sha256(open(res["meta"]["cache"], "rb").read()).hexdigest()
    assert prov["images_per_domain"] == 64 and prov["seeds"]["run"] == 3 and prov["setting"] == "continual"
    assert prov["severity"] == 5 and prov["dirichlet"] is None and "digits_vit_" in prov["model"]
    assert list(prov["methods"]) == methods and prov["methods"]["source"] == {"class": "Source"}
    assert prov["methods"]["imse-mix"]["config"]["retrieval"] == "mix"
    assert prov["methods"]["imse-nodiv"]["config"]["diversity_weight"] == 0.0
    assert prov["methods"]["tent"]["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert res["methods"]["imse"]["hyperparameters"] == prov["methods"]["imse"]
    for key in ("torch", "timm", "numpy", "safetensors", "triton", "python"):
        assert key in prov["versions"]
    assert set(prov["git"]) == {"commit", "dirty"} and prov["device"]["cpu"]
    assert res["meta"]["stream_sha256"] is None and res["meta"]["images_per_domain"] == 64
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
    assert "detection delay mean (batches)" in stdout and "false positives / 100 batches" in stdout
    assert "sha256 " + prov["checkpoint_sha256"][:12] in stdout
    try:
        import matplotlib  # noqa: F401

        assert (out / "accuracy.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in stdout and not (out / "accuracy.png").exists()


def test_reset_and_recurring_settings_and_determinism(tmp_path, digits_cache, capsys):
    base = CI + ["--corruptions", "fog,impulse_noise", "--cache-dir", digits_cache, "--method", "source,imse",
                 "--no-plot"]
    rc, _, err = run_cli(base + ["--setting", "reset_each_shift", "--output-dir", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["methods"]["imse"]["shift_detection"] is None
    assert not [e for e in res["methods"]["imse"]["events"] if e["kind"] == "shift"], "reset before every domain"

    rc, _, err = run_cli(base + ["--setting", "recurring", "--rounds", "2", "--output-dir", str(tmp_path / "b")],
                         capsys)
    assert rc == 0, err
    rec = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [s["label"] for s in rec["segments"]] == ["r1:fog", "r1:impulse_noise", "r2:fog", "r2:impulse_noise"]
    assert rec["meta"]["imse_lr"] == 3e-3 and rec["meta"]["true_boundaries"] == [2, 4, 6]
    src = rec["methods"]["source"]["correct"]
    assert src[:2] == src[2:], "the same images in both rounds"

    rc, _, err = run_cli(base + ["--setting", "recurring", "--rounds", "2", "--output-dir", str(tmp_path / "c")],
                         capsys)
    again = json.loads((tmp_path / "c" / "results.json").read_text())
    assert again["methods"]["imse"]["correct"] == rec["methods"]["imse"]["correct"]
    assert again["methods"]["imse"]["events"] == rec["methods"]["imse"]["events"], "same seed, same run"


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    rc, _, err = run_cli(["--data", "imagenet-c", "--no-progress"], capsys)
    assert rc == 2 and "needs --data-dir" in err
    rc, _, err = run_cli(["--data", "imagenet-c", "--data-dir", str(tmp_path / "nowhere"), "--no-progress"], capsys)
    assert rc == 2 and "ImageNet-C directory not found" in err and "nowhere" in err
    (tmp_path / "inc" / "fog" / "5").mkdir(parents=True)
    rc, _, err = run_cli(["--data", "imagenet-c", "--data-dir", str(tmp_path / "inc"), "--model", "test_vit",
                          "--checkpoint", str(tmp_path / "missing.safetensors"), "--corruptions", "fog",
                          "--no-progress"],
                         capsys)
    assert rc == 2 and "checkpoint file not found" in err and "missing.safetensors" in err
    rc, _, err = run_cli(["--method", "source,bogus", "--no-progress"], capsys)
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
    rc, stdout, err = run_cli(["--data", "imagenet-c", "--data-dir", str(tmp_path / "inc"), "--corruptions",
                               "gaussian_noise,fog", "--subset", "full", "--preprocess", "timm", "--model", "test_vit",
                               "--checkpoint",
                               str(tmp_path / "test_vit.safetensors"), "--source-dir",
                               str(tmp_path / "inc" / "clean" / "x"),
                               "--method", "source,imse", "--batch-size", "4", "--output-dir", str(out),
                               "--no-progress", "--no-plot", "--threads", "1"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["data_config"]["input_size"] == [3, 160, 160] and res["meta"]["preprocess"] == "timm"
    assert res["config"]["run"]["subset"] == "full" and res["meta"]["protocol"]["order"] == "shuffled by seed 0"
    assert res["provenance"]["model"] == "test_vit" and res["provenance"]["images_per_domain"] == 6
    assert res["provenance"]["checkpoint_sha256"] == hashlib.sha256(
        (tmp_path / "test_vit.safetensors").read_bytes()).hexdigest()
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


def test_multi_stream_setting_equals_separate_adapters(tmp_path, digits_cache, capsys):
    """--setting multi_stream: K streams in mixed batches through MultiStreamIMSE give the accuracy of K
    separate IMSE adapters (the adapter's contract), per stream, with each one's throughput."""
    out = tmp_path / "ms"
    rc, text, err = run_cli(CI + ["--cache-dir", digits_cache, "--setting", "multi_stream", "--streams", "3",
                                  "--batch-size", "16", "--corruptions", "gaussian_noise,fog,pixelate",
                                  "--output-dir", str(out)], capsys)
    assert rc == 0, err
    data = json.loads((out / "results.json").read_text())
    multi, sep = data["methods"]["multi_stream"], data["methods"]["separate"]
    assert multi["correct"] == sep["correct"] and len(multi["accuracy"]) == 3
    assert all(t == 3 * 64 for t in multi["total"])  # every stream sees every domain once
    assert multi["max_logit_diff"] < 1e-3
    assert sorted(map(sorted, data["orders"])) == [sorted(["gaussian_noise", "fog", "pixelate"])] * 3
    assert "multi_stream" in text and "separate" in text and "img/s" in text
    prov = data["provenance"]
    assert prov["methods"]["multi_stream"]["class"] == "MultiStreamIMSE" and prov["images_per_domain"] == 64
    assert prov["checkpoint_sha256"] == hashlib.sha256(open(data["meta"]["cache"], "rb").read()).hexdigest()


def test_correlated_setting(tmp_path, digits_cache, capsys):
    """Labels in Dirichlet runs inside each domain, the domains in the continual order: Source's per-domain
    accuracy is the one computed without the harness (order does not matter to it), boundaries as continual."""
    out = tmp_path / "cor"
    rc, stdout, err = run_cli(CI + ["--cache-dir", digits_cache, "--setting", "correlated", "--dirichlet", "0.05",
                                    "--corruptions", "gaussian_noise,contrast", "--method", "source,imse", "--no-plot",
                                    "--output-dir", str(out)], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["dirichlet"] == 0.05 == res["provenance"]["dirichlet"]
    assert res["meta"]["true_boundaries"] == [2] and len(res["meta"]["stream_sha256"]) == 64
    for k, c in enumerate(["gaussian_noise", "contrast"]):
        assert res["methods"]["source"]["accuracy"][k] == pytest.approx(_source_accuracy(digits_cache, c, 5, 0))
    imse = res["methods"]["imse"]
    assert imse["total"] == [64, 64] and imse["batches"] == [2, 2] and imse["stream_batches"] == 4
    det = imse["shift_detection"]
    assert det == shift_detection(det["detected"], [2], 2, 4) | {"matched": [list(m) for m in det["matched"]]}
    assert "correlated · dirichlet 0.05" in stdout


def test_mixed_correlated_over_seeds(tmp_path, digits_cache, capsys):
    """--seeds: the comparison per seed, mean ± std and min-max of each method's mean accuracy; a mixed stream
    still scores every image against its own domain (Source as computed without the harness, per seed)."""
    out = tmp_path / "mix"
    rc, stdout, err = run_cli(CI + ["--cache-dir", digits_cache, "--setting", "mixed_correlated", "--seeds", "0,1",
                                    "--corruptions", "gaussian_noise,contrast", "--method", "source,imse", "--no-plot",
                                    "--output-dir", str(out)], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["seeds"] == [0, 1] and res["provenance"]["seeds"]["run"] == [0, 1]
    assert [r["seed"] for r in res["runs"]] == [0, 1] and res["meta"]["true_boundaries"] is None
    assert res["runs"][0]["stream_sha256"] != res["runs"][1]["stream_sha256"]
    for run in res["runs"]:
        for k, c in enumerate(["gaussian_noise", "contrast"]):
            assert run["methods"]["source"]["accuracy"][k] == pytest.approx(
                _source_accuracy(digits_cache, c, 5, run["seed"]))
        assert run["methods"]["imse"]["total"] == [64, 64] and run["methods"]["imse"]["stream_batches"] == 4
        det = run["methods"]["imse"]["shift_detection"]
        assert det["boundaries"] is None and det["precision"] is None
        assert det["shifts_per_100_batches"] == 25.0 * len(det["detected"])
    for name in ("source", "imse"):
        per = [run["methods"][name]["mean_accuracy"] for run in res["runs"]]
        agg = res["aggregate"][name]["mean_accuracy"]
        assert agg["per_seed"] == pytest.approx(per) and agg["mean"] == pytest.approx(statistics.fmean(per))
        assert agg["std"] == pytest.approx(statistics.stdev(per))
        assert (agg["min"], agg["max"]) == pytest.approx((min(per), max(per)))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    assert {r["setting"] for r in rows} == {"mixed_correlated"}
    assert "mean of 2 seeds" in stdout and "±" in stdout and "shifts per 100 batches" in stdout


def test_help_and_option_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for setting in ("continual", "reset_each_shift", "gradual", "recurring", "correlated", "mixed_domains",
                    "mixed_correlated", "multi_stream"):
        assert f"{setting}:" in text, setting
    assert "--dirichlet" in text and "--seeds" in text
    rc, _, err = run_cli(["--seeds", "0,x", "--no-progress"], capsys)
    assert rc == 2 and "--seeds" in err
    rc, _, err = run_cli(["--dirichlet", "0", "--setting", "correlated", "--no-progress"], capsys)
    assert rc == 2 and "--dirichlet must be > 0" in err
    rc, _, err = run_cli(["--setting", "multi_stream", "--seeds", "0,1", "--no-progress"], capsys)
    assert rc == 2 and "--seeds" in err
