"""Smoke tests of the benchmark scripts: throughput.py (the driver over layer_bench.py and model_bench.py)
runs end to end and writes its files, report.py re-renders them, step_profile.py and compile_warmup.py run, and the flag
presets and targets resolve. They check that the benchmarks work, not their numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "throughput.py"

pytest.importorskip("timm")


def test_throughput_quick(tmp_path):
    env = dict(os.environ)
    env.pop("IMSE_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it; the triton interpreter is for tests, not timing
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--plot", "--gflops", "--out-dir", str(tmp_path), "--tag", "smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Layer level" in proc.stdout and "Model level" in proc.stdout and "Targets" in proc.stdout
    assert "Achieved GFLOP/s, layer level" in proc.stdout and "Gaps:" in proc.stdout
    import imse_kernels

    banner = f"measuring imse_kernels {imse_kernels.__version__} from {Path(imse_kernels.__file__).resolve().parent}"
    assert banner in proc.stdout  # the run names the package it measured
    loaded = imse_kernels._extension.reason("_C") is None
    assert ("compiled CPU extension (_C): loaded" in proc.stdout) == loaded
    assert ("the compiled C++ extension is NOT loaded" in proc.stdout) == (not loaded)

    stem = tmp_path / "throughput_smoke_quick"
    for ext in ("json", "csv", "txt"):
        assert (stem.with_suffix(f".{ext}")).is_file(), f"missing {ext} output"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["env"]["torch"] and "git_commit" in data["env"]
    rows = data["results"]
    layer = {r["provider"]: r for r in rows if r["level"] == "layer" and r["mode"] == "fwdbwd"}
    for p in ("linear", "linear_frozen", "reference", "naive", "fused_torch", "fused_auto"):
        assert p in layer, f"layer provider {p} missing"
        assert not layer[p]["error"], layer[p]["error"]
        assert layer[p]["median_ms"] > 0
    assert layer["fused_auto"]["ratio_vs_baseline"] > 0 and layer["fused_auto"]["saved_mb"] is not None
    # vit_s.proj at b1: linear is dense (3 GEMMs), naive is factorized (2 passes)
    assert layer["linear"]["gflop"] == pytest.approx(3 * 2 * 197 * 384 * 384 / 1e9, rel=1e-4)
    assert layer["naive"]["gflop"] == pytest.approx(2 * 2 * 197 * 384 * (384 + 384) / 1e9, rel=1e-4)
    model = {r["provider"]: r for r in rows if r["level"] == "model"}
    for p in ("imse_harness", "imse_reference", "source"):
        assert p in model and not model[p]["error"], model.get(p)
        assert model[p]["items_per_s"] > 0
    assert model["imse_reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert 0 < model["imse_harness"]["gflop"] < model["imse_reference"]["gflop"]  # recomposing costs GEMM work
    assert (stem.with_suffix(".csv")).read_text().startswith("level,case,batch")

    again = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(stem.with_suffix(".json")),
                            "--no-save"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.startswith("imse_kernels throughput  device=cpu  machine=smoke_quick")
    assert "Layer level" in again.stdout and "Targets" in again.stdout and "re-rendered from" in again.stdout


def test_throughput_rejects_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--modes", "sideways", "--no-save"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "sideways" in proc.stderr


def test_step_profile_runs():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--model", "vit_tiny", "--depth", "4",
         "--img-size", "64", "--batch", "2", "--reps", "1", "--providers", "imse_harness,tent"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.startswith("measuring imse_kernels")  # it names the package it measured
    rows = _profile_rows(proc.stdout)
    assert set(rows) == {("imse_harness", "fp32"), ("tent", "fp32")}
    assert all(v >= 0 for vals in rows.values() for v in vals) and all(vals[4] > 0 for vals in rows.values())
    assert rows[("imse_harness", "fp32")][5] == 1.0  # x/first: the first provider against itself


def _profile_rows(stdout: str) -> dict:
    """step_profile's table: (provider, precision) -> [GEMM, attention, casts, other, wall, x/first]."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("provider"))
    rows = {}
    for line in lines[head + 1:]:
        if line.startswith("wrote "):
            break
        p, prec, *vals = line.split()
        rows[(p, prec)] = [float(v) for v in vals]
    return rows


def _native_bf16() -> bool:
    import torch

    from imse_kernels.precision import cpu_native_dtype

    return cpu_native_dtype(torch.bfloat16)


@pytest.mark.skipif(not _native_bf16(), reason="no native bf16 on this CPU: the benchmarks skip bf16 (tested below)")
def test_precisions_are_measured_side_by_side(tmp_path):
    """model_bench and layer_bench --precisions fp32,bf16: every provider in both precisions in one run, with the
    paired fp32/x and ref32/x ratios; step_profile splits the bf16 step the same way."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    for script, extra in (("model_bench.py", []), ("layer_bench.py", ["--providers", "linear,reference,fused_auto"])):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--precisions",
                               "fp32,bf16", "--no-memory", "--out-dir", str(tmp_path), "--tag", "smoke", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        level = script.split("_")[0]
        rows = json.loads((tmp_path / f"{level}_smoke_quick.json").read_text())["results"]
        assert {r["dtype"] for r in rows} == {"fp32", "bf16"}, script
        for r in rows:
            assert not r["error"], r
            if r["dtype"] == "bf16":
                assert r["speedup_vs_fp32"] > 0 and r["speedup_vs_reference_fp32"] > 0, r
            else:
                assert r["speedup_vs_fp32"] is None and r["speedup_vs_reference_fp32"] > 0, r
        assert "fp32/x" in proc.stdout or "fp32/auto" in proc.stdout
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--model", "vit_tiny", "--depth", "4",
         "--img-size", "64", "--batch", "2", "--reps", "1", "--providers", "imse", "--precisions", "fp32,bf16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert set(_profile_rows(proc.stdout)) == {("imse", "fp32"), ("imse", "bf16")}


def test_benchmarks_skip_bf16_on_a_cpu_without_it(monkeypatch):
    _throughput_module()
    import bench_common as BC
    import torch

    from imse_kernels import precision

    monkeypatch.setattr(precision, "cpu_native_dtype", lambda dtype: dtype in (torch.float32, torch.float64))
    monkeypatch.delenv(precision.ALLOW_SLOW_ENV, raising=False)
    said = []
    assert BC.usable_precisions(["fp32", "bf16"], "cpu", said.append) == ["fp32"]
    assert len(said) == 1 and "bf16 skipped" in said[0] and "no native bf16" in said[0]
    assert BC.usable_precisions(["fp32", "bf16"], "cuda", said.append) == ["fp32", "bf16"]


def test_compile_warmup_counts_graphs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile_warmup.py"), "--model", "vit_tiny", "--depth", "4",
         "--img-size", "64", "--batches", "4,4,3", "--backend", "aot_eager", "--eager-reps", "1",
         "--out-dir", str(tmp_path), "--tag", "smoke"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.startswith("measuring imse_kernels")
    data = json.loads((tmp_path / "compile_warmup_smoke.json").read_text())
    assert [c["batch"] for c in data["calls"]] == [4, 4, 3]
    graphs = [c["graphs"] for c in data["calls"]]
    assert graphs[0] >= 1 and graphs[1] == graphs[0]  # the same batch size reuses its graph
    assert (tmp_path / "compile_warmup_smoke.txt").read_text().startswith("compile warm-up: vit_tiny")


def _throughput_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    return throughput


def test_no_flags_is_the_headline_run_and_full_is_the_sweep():
    tp = _throughput_module()
    head = tp.parse_args([])
    assert head.headline and head.cases == tp.HEADLINE_LAYER and head.models == ["vit_small"]
    assert head.model_batches == [1, 8] and head.model_providers == "imse,imse_reference"
    full = tp.parse_args(["--full"])
    assert not full.headline and full.cases is None
    assert len(full.nets) * len(full.layers) * len(full.batches) * len(full.modes) == 96
    assert not tp.parse_args(["--nets", "vit_b"]).headline  # an explicit selection is measured as asked
    tri = tp.parse_args(["--triton", "--batches", "1"])  # the triton backend's GPU cases, one flag overridden
    assert not tri.headline and tri.nets == ["vit_b"] and tri.batches == [1] and tri.dtypes == ["bf16", "fp32"]
    assert tri.modes == ["fwdbwd", "infer"] and "fused_triton_F" in tri.providers


def test_targets_come_from_the_data_file_and_can_fail():
    _throughput_module()
    import report as tp
    from bench_common import Record

    names = {t["name"] for t in tp.load_targets("cpu")}
    assert "IMSE step ViT-S b1, ref/imse" in names and len(names) == len(tp.load_targets("cpu"))
    assert any(t["provider"] == "fused_triton" for t in tp.load_targets("cuda"))
    rec = Record(level="layer", case="vit_s.qkv", batch=64, tokens=64 * 197, mode="fwdbwd", dtype="fp32",
                 provider="fused_auto", median_ms=1.0, min_ms=1.0, q1_ms=1.0, q3_ms=1.0, rounds=3, number=1,
                 baseline="linear", ratio_vs_baseline=1.2, speedup_vs_reference=2.0, ratio_vs_baseline_min=1.1,
                 speedup_vs_reference_min=2.0)
    target = {"name": "qkv", "level": "layer", "case": "vit_s.qkv", "provider": "fused_auto",
              "metric": "ratio_vs_baseline", "op": "<=", "value": 1.05}
    assert "FAIL  qkv: 1.20" in tp.bars_report([rec], [], "cpu", [target])
    assert "PASS  qkv" in tp.bars_report([rec], [], "cpu", [dict(target, value=1.3)])
    assert "n/a   qkv" in tp.bars_report([], [], "cpu", [target])


def test_streams_bench_quick(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "streams_bench.py"), "--quick",
                           "--out-dir", str(tmp_path), "--tag", "smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "measuring imse_kernels" in proc.stdout and "codes/one_code" in proc.stdout
    data = json.loads((tmp_path / "streams_smoke_quick_layer_model.json").read_text())
    (row,) = data["layer"]
    assert row["streams"] == 2 and row["codes_over_one_code"] > 0 and row["loop_over_codes"] > 0
    layouts = [r for r in data["model"] if "streams" in r]
    assert [(r["streams"], r["per_stream"]) for r in layouts] == [(2, 1), (2, 2)]
    assert all(r["multi_over_imse"] > 0 and r["separate_over_multi"] > 0 for r in layouts)
    assert "batching pays up to batch" in proc.stdout
