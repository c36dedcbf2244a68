"""imse-eval's config files and overrides (docs/design.md, section 12): layers, `--set`, trailing KEY VALUE pairs,
misspelt keys, the hyper-parameters reaching the built adapters, the rerun from a results.json, usage errors
against bugs, and the OpenMP restart."""
import json

import pytest
from helpers import tiny_vit

from imse_kernels.eval import __main__ as cli
from imse_kernels.eval.__main__ import check, main
from imse_kernels.eval.methods import MethodOptions, build_method
from imse_kernels.eval.run_config import RunConfig, resolve
from imse_kernels.tta import ConfigError

CI = ["--train-steps", "40", "--n-test", "64", "--batch-size", "32", "--no-progress", "--threads", "1", "--no-plot"]


def test_layers_replace_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  batch_size: 16\n  methods: [sar, imse]\nsar:\n  lr: 1.0e-3\n  rho: 0.1\n")
    plan = check(["--config", str(f)])
    assert plan.run.batch_size == 16 and plan.run.methods == ("sar", "imse") and plan.config.methods["sar"].rho == 0.1
    plan = check(["--config", str(f), "--batch-size", "8", "--set", "sar.rho=0.2", "sar.lr", "5e-4"])
    assert plan.run.batch_size == 8, "an option given replaces the file's value"
    assert plan.config.methods["sar"].rho == 0.2 and plan.config.methods["sar"].lr == 5e-4
    plan = check(["--config", str(f), "--set", "sar.rho=0.2", "--set", "sar.rho=0.3"])
    assert plan.config.methods["sar"].rho == 0.3, "later overrides win"
    assert check(["--config", str(f), "run.batch_size", "4", "--method", "tent"]).run.batch_size == 4
    # options not given keep the file's values (argparse defaults do not count as given)
    assert check(["--config", str(f), "--threads", "1"]).run.batch_size == 16
    assert check(["--imse-lr", "1e-3", "--method", "imse,imse-mix"]).config.methods["imse-mix"].lr == 1e-3
    assert check(["--setting", "recurring", "--method", "imse"]).config.methods["imse"].lr == 3e-3
    assert check(["--setting", "recurring", "--method", "imse", "imse.lr", "1e-2"]).config.methods["imse"].lr == 1e-2


def test_every_run_option_is_a_run_key():
    fields = set(RunConfig.keys())
    parser = cli.build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "config", "set", "overrides", "omp_wait_policy"}
    invocation = {"output_dir", "no_progress", "no_plot", "cache_dir", "workers", "dist_timeout"}
    aliases = {"method": "methods", "seed": "seeds", "tent_lr": None, "tent_optimizer": None, "imse_lr": None}
    missing = [d for d in dests - invocation if aliases.get(d, d) is not None and aliases.get(d, d) not in fields]
    assert not missing, missing


@pytest.mark.parametrize("name, key, value, reached", [
    ("tent", "weight_decay", "0.01", lambda a: a.optimizer.param_groups[0]["weight_decay"] == 0.01),
    ("tent", "lr", "0.02", lambda a: a.optimizer.param_groups[0]["lr"] == 0.02),
    ("sar", "rho", "0.07", lambda a: a.optimizer.param_groups[0]["rho"] == 0.07),
    ("sar", "momentum", "0.8", lambda a: a.optimizer.param_groups[0]["momentum"] == 0.8),
    ("eata", "momentum", "0.7", lambda a: a.optimizer.param_groups[0]["momentum"] == 0.7),
    ("cotta", "weight_decay", "0.01", lambda a: a.optimizer.param_groups[0]["weight_decay"] == 0.01),
    ("cotta", "soft_augment", "true", lambda a: a.augment.soft and a.augment.ranges()["hue"] == (-0.03, 0.03)),
    ("deyo", "lr", "2e-3", lambda a: a.optimizer.param_groups[0]["lr"] == 2e-3 / 64 * 32),
    ("deyo", "patch_len", "2", lambda a: a.config.patch_len == 2),
    ("imse", "betas", "0.8,0.99", lambda a: a.optimizer.param_groups[0]["betas"] == (0.8, 0.99)),
    ("imse", "shift_threshold", "0.2", lambda a: a.bank.tracker.threshold == 0.2),
    ("imse-mix", "temperature", "3", lambda a: a.bank.temperature == 3.0 and a.bank.retrieval == "mix"),
])
def test_set_reaches_the_built_adapter(name, key, value, reached):
    """--set <method>.<key>=<value> for a hyper-parameter of each method: the value is in the adapter that the
    run builds (its optimizer, bank or augmentation), not only in the config."""
    plan = check(["--method", name, "--batch-size", "32", "--set", f"{name}.{key}={value}"])
    opts = MethodOptions(plan.config.methods, plan.run.batch_size, 0)
    adapter = build_method(name, tiny_vit(seed=0, head_scale=None), opts)
    assert reached(adapter), (name, key)


def test_source_has_no_keys_and_misspellings_name_the_nearest(capsys):
    assert main(["--set", "source.lr=1", "--no-progress"]) == 2
    assert "source has no hyper-parameters" in capsys.readouterr().err
    for args, want in ((["--set", "sar.lrr=1e-3"], "unknown key 'sar.lrr' (did you mean 'sar.lr'?)"),
                       (["--set", "sra.lr=1e-3"], "unknown section 'sra' (did you mean 'sar'?)"),
                       (["run.batchsize", "32"], "unknown key 'run.batchsize' (did you mean 'run.batch_size'?)"),
                       (["sar.lr"], "'sar.lr' has no value"),
                       (["--set", "sar.lr"], "--set takes KEY=VALUE"),
                       (["--set", "lr=1"], "a key is <section>.<field>"),
                       (["--method", "sar,sra"], "unknown method 'sra' (did you mean 'sar'?)"),
                       (["--set", "run.severity=9"], "--severity must be 1..5, got 9"),
                       (["--set", "sar.lr=fast"], "SARConfig: lr cannot be read from 'fast'"),
                       (["--config", "/nonexistent/x.yaml"], "config file not found")):
        assert main(args + ["--no-progress"]) == 2, args
        assert want in capsys.readouterr().err, (args, want)


def test_bad_config_files_are_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2]\n")
    assert main(["--config", str(bad)]) == 2 and "maps sections" in capsys.readouterr().err
    bad.write_text("run: {batch_size: 8\n")
    assert main(["--config", str(bad)]) == 2 and "not a readable config file" in capsys.readouterr().err
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")  # safe_load executes nothing
    assert main(["--config", str(bad)]) == 2 and "not a readable config file" in capsys.readouterr().err


def test_a_bug_shows_its_traceback(monkeypatch, digits_cache):
    """Only UsageError and ConfigError become exit status 2; any other exception (a bug) propagates."""
    def boom(plan, session, writer=None):
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(cli, "run_seeds", boom)
    with pytest.raises(ValueError, match="a bug"):
        main(CI + ["--cache-dir", digits_cache, "--method", "source", "--corruptions", "fog"])


def test_rerun_from_results_json_reproduces_the_run(tmp_path, digits_cache, capsys):
    """The resolved config in results.json runs again as it was: same correct counts, events and printed table
    (but for the measured speed and memory rows), the effective learning rates recorded."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = CI + ["--cache-dir", digits_cache, "--corruptions", "gaussian_noise,contrast",
                 "--method", "source,sar,deyo,imse", "--set", "sar.rho=0.1", "deyo.plpd_threshold", "0.1",
                 "--seed", "2", "--output-dir", str(a)]
    capsys.readouterr()
    assert main(args) == 0
    out_a = capsys.readouterr().out
    first = json.loads((a / "results.json").read_text())
    rec = first["config"]
    assert rec["run"]["seeds"] == [2] and rec["run"]["batch_size"] == 32 and rec["sar"]["rho"] == 0.1
    assert rec["deyo"]["plpd_threshold"] == 0.1 and rec["deyo"]["seed"] is None
    assert first["meta"]["effective_lr"] == {"source": None, "sar": 0.001 / 64 * 32, "deyo": 0.001 / 64 * 32,
                                             "imse": 7e-3}
    assert first["provenance"]["methods"]["deyo"]["config"]["seed"] == 2, "the run's seed fills the None"
    rerun = ["--config", str(a / "results.json"), "--output-dir", str(b), "--cache-dir", digits_cache, "--no-progress"]
    assert main(rerun) == 0
    out_b = capsys.readouterr().out
    second = json.loads((b / "results.json").read_text())
    assert second["config"] == rec
    for name in rec["run"]["methods"]:
        x, y = first["methods"][name], second["methods"][name]
        assert x["correct"] == y["correct"] and x["events"] == y["events"], name
        assert x["hyperparameters"] == y["hyperparameters"], name

    def table(stdout):  # the speed, memory and wall-time lines are measurements of this run, not results
        skip = ("images/s", "peak", "wall time", "wrote")
        return [line for line in stdout.splitlines() if not line.startswith(skip)]

    assert table(out_a) == table(out_b) and "mean accuracy (%)" in out_a


@pytest.mark.parametrize("choice, env, cuda, want", [
    ("auto", None, False, "PASSIVE"), ("auto", "ACTIVE", False, None), ("auto", None, True, None),
    ("passive", "ACTIVE", False, "PASSIVE"), ("passive", "PASSIVE", False, None), ("active", None, True, "ACTIVE"),
    ("inherit", None, False, None),
])
def test_openmp_restart_is_an_explicit_choice(monkeypatch, choice, env, cuda, want):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, argv, environ: calls.append(environ["OMP_WAIT_POLICY"]))
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: cuda)
    if env is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", env)
    cli.restart_for_openmp(choice)
    assert calls == ([] if want is None else [want])


def test_resolve_checks_unused_sections_too():
    with pytest.raises(ConfigError, match="unknown key 'cotta.alpha'"):
        resolve([{"run": {"methods": ["sar"]}, "cotta": {"alpha": 0.5}}])
    assert resolve([{"run": {"methods": "all"}}]).run.methods[0] == "source"


def test_data_options_resolve_to_the_protocol_that_runs(tmp_path):
    """Each data set's defaults are filled in (so results.json records them and a rerun repeats them); options
    for another data set, and corruptions digits cannot make, are errors."""
    from imse_kernels.eval.errors import DataError

    inc = check(["--data", "imagenet-c", "--data-dir", str(tmp_path), "--model", "m"]).run
    assert (inc.subset, inc.preprocess, inc.image_check, inc.report) == ("5000", "res256crop224", "header", "error")
    assert inc.n_test is None and inc.corruptions == tuple(RunConfig().corruptions)
    c10 = check(["--data", "cifar10-c", "--data-dir", str(tmp_path), "--corruptions", "all", "--model", "m"]).run
    assert (c10.subset, c10.preprocess, c10.report, c10.corruptions) == (None, None, "error", ("all",))
    digits = check([]).run
    assert (digits.data, digits.n_test, digits.report, digits.subset) == ("digits", 512, "accuracy", None)
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  data: imagenet-c\n  subset: 5000\n  preprocess: crop224\n  report: accuracy\n")
    run = check(["--config", str(f), "--data-dir", str(tmp_path), "--model", "m", "--set",
                 "run.max_per_domain=100"]).run
    assert (run.subset, run.preprocess, run.report, run.max_per_domain) == ("5000", "crop224", "accuracy", 100)
    with pytest.raises(ConfigError, match="subset must be one of"):
        check(["--config", str(f), "--data-dir", str(tmp_path), "--set", "run.subset=500"])
    with pytest.raises(DataError, match="--subset does not apply to --data cifar10-c"):
        check(["--data", "cifar10-c", "--data-dir", str(tmp_path), "--subset", "full"])
    with pytest.raises(DataError, match="--label-map does not apply to --data digits"):
        check(["--label-map", "x.txt"])
    with pytest.raises(ConfigError, match="speckle_noise: ImageNet-C's extra corruptions, read from disk with"):
        check(["--corruptions", "fog,speckle_noise"])
    assert main(["--corruptions", "fog,speckle_noise", "--no-progress"]) == 2
