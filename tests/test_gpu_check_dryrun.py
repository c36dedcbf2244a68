"""The GPU check's plumbing on the CPU: benchmarks/gpu_check.sh in its dry run, and the correctness
driver benchmarks/gpu_correctness.py, including a planted fault that it must report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "gpu_correctness.py"
STAGES = ["build", "imse_kernels_info", "correctness", "bench_bf16", "sanitizer", "tests_gpu",
          "bench_fp32", "bench_model", "bench_triton"]


def _env(**extra):
    env = dict(os.environ)
    for k in ("IMSE_BACKEND", "TRITON_INTERPRET", "STAGES", "SKIP_BUILD", "GPU_CHECK_BUDGET_S"):
        env.pop(k, None)
    env.update(extra)
    return env


def _records(lines):
    recs = [json.loads(line) for line in lines if line.strip().startswith("{")]
    checks = [r for r in recs if "primitive" in r]
    summary = [r for r in recs if r.get("summary")]
    return recs, checks, summary


def _driver(*args, timeout=120):
    return subprocess.run([sys.executable, str(DRIVER), *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("timm")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=150, env=_env(GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    summary = (tmp_path / "summary.log").read_text()
    stage_lines = [line for line in summary.splitlines() if "] stage " in line]
    for name in STAGES:
        named = [line for line in stage_lines if f" {name}:" in line]
        assert named, f"stage {name} missing from summary.log:\n{summary}"
        if name != "build":  # the dry run skips the pip install; every other stage must succeed
            assert all("rc=0" in line for line in named), named
    assert "dry run: skipped (needs a GPU)" in (tmp_path / "sanitizer.log").read_text()
    assert "dry run: skipped (needs a GPU)" in (tmp_path / "tests_gpu.log").read_text()
    assert "file check: PASS" in summary

    recs, checks, final = _records((tmp_path / "correctness.jsonl").read_text().splitlines())
    assert recs[0].get("header") and recs[0]["extension_C"] == "loaded", recs[0]
    assert len(checks) > 50 and len(final) == 1
    assert final[0]["failed"] == 0 and final[0]["errors"] == 0 and final[0]["checks"] == len(checks)
    assert {c["backend"] for c in checks} == {"cpu"}

    entries = list(tmp_path.iterdir())
    assert len(entries) <= 8, [p.name for p in entries]
    assert not [p for p in entries if p.is_dir()], "OUT must stay flat"
    assert (tmp_path / "bench_results.tar.gz").stat().st_size > 0


def test_correctness_driver_cpu(tmp_path):
    out_file = tmp_path / "c.jsonl"
    proc = _driver("--device", "cpu", "--backends", "torch,cpu", "--quick", "--out", str(out_file))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    recs, checks, final = _records(proc.stdout.splitlines())
    assert recs[0]["header"] and recs[0]["imse_kernels"].endswith("__init__.py")
    assert final == [r for r in _records(out_file.read_text().splitlines())[2]]
    assert final[0]["failed"] == 0 and final[0]["errors"] == 0
    assert {c["backend"] for c in checks} == {"torch", "cpu"}
    assert {c["dtype"] for c in checks} == {"bf16", "fp16", "fp32"}  # tf32 is cuda only
    assert {c.get("layout") for c in checks} == {"contiguous", "transposed", "strided", "offset1"}
    keys = {"backend", "primitive", "dtype", "shape", "max_abs_err", "max_rel_err", "tol", "ok", "error", "seconds"}
    assert all(keys <= set(c) for c in checks)
    prims = {c["primitive"].split("(")[0] for c in checks}
    assert {"factorized_forward", "recompose", "factorized_backward", "factorized_input_grad",
            "recomposed_backward", "spectral_linear", "determinism"} <= prims


def test_correctness_driver_reports_a_wrong_backend():
    proc = _driver("--device", "cpu", "--backends", "cpu", "--quick", "--inject-fault", "scale")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    _, checks, final = _records(proc.stdout.splitlines())
    faulty = [c for c in checks if c["primitive"].startswith("factorized_forward")]
    assert faulty and all(not c["ok"] for c in faulty)  # every dtype, bf16 too
    assert all(c["ok"] for c in checks if c not in faulty)
    assert final[0]["failed"] == len(faulty) and final[0]["errors"] == 0
    assert "FAIL cpu factorized_forward" in proc.stderr


def test_correctness_driver_records_errors():
    # a backend that cannot run on the device is an error line, and the run still finishes with a summary
    proc = _driver("--device", "cpu", "--backends", "cuda,cpu", "--quick", "--dtypes", "fp32")
    _, checks, final = _records(proc.stdout.splitlines())
    assert proc.returncode == 1
    assert [c["backend"] for c in checks if c["error"]] == ["cuda"]
    assert final[0]["errors"] == 1 and final[0]["passed"] == final[0]["checks"] - 1
