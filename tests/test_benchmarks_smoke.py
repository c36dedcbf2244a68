"""Smoke test of benchmarks/throughput.py: the script runs end to end (layer and model level) and writes
its files. It checks that the benchmark works, not its numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"

pytest.importorskip("timm")


def test_throughput_quick(tmp_path):
    env = dict(os.environ)
    env.pop("IMSE_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it; the triton interpreter is for tests, not timing
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--plot", "--out-dir", str(tmp_path), "--tag", "smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Layer level" in proc.stdout and "Model level" in proc.stdout and "Bars" in proc.stdout

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
    model = {r["provider"]: r for r in rows if r["level"] == "model"}
    for p in ("imse_harness", "imse_reference", "source"):
        assert p in model and not model[p]["error"], model.get(p)
        assert model[p]["items_per_s"] > 0
    assert model["imse_reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert 0 < model["imse_harness"]["gflop"] < model["imse_reference"]["gflop"]  # recomposing costs GEMM work
    assert (stem.with_suffix(".csv")).read_text().startswith("level,case,batch")


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
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"imse_harness", "tent"} and all(v > 0 for vals in rows.values() for v in vals)
