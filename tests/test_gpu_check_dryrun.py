"""The GPU check's plumbing on the CPU: benchmarks/gpu_check.sh in its dry run, and the correctness
driver benchmarks/gpu_correctness.py, including a planted fault that it must report."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "gpu_correctness.py"
# The summary lines of a full dry run, in the order the stages must run (the order of their evidence).
STEPS = ["stage 0 versions/compile_check", "stage 1 build", "stage 1 build/imse_kernels_info",
         "stage 2 correctness/warmup", "stage 2 correctness", "stage 3 tests_gpu", "stage 4 sanitizer/memcheck",
         "stage 4 sanitizer/racecheck", "stage 5 bench/bf16", "stage 5 bench/fp32", "stage 5 bench/model"]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _env(**extra):
    env = dict(os.environ)
    for k in ("IMSE_BACKEND", "TRITON_INTERPRET", "STAGES", "SKIP_BUILD", "GPU_CHECK_BUDGET_S",
              "GPU_CHECK_ASSUME_NO_BUILD"):
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


def _dry_run(out, timeout=420, **env):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=_env(GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, **env))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = (out / "summary.log").read_text()
    return summary, [line for line in summary.splitlines() if "] stage " in line]


def _line_of(step: str, lines: list[str]) -> int:
    """The index of the summary line of `step` (its name followed by ':')."""
    found = [i for i, line in enumerate(lines) if f"] {step}: " in line]
    assert len(found) == 1, (step, lines)
    return found[0]


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("timm")
    summary, lines = _dry_run(tmp_path)
    order = [_line_of(step, lines) for step in STEPS]
    assert order == sorted(order), "stages out of order:\n" + "\n".join(lines)
    for step in STEPS:
        line = lines[_line_of(step, lines)]
        assert "rc=0" in line and re.search(r"\(cap \d+s\)|dry run: skipped", line), line
    plan = next(line for line in summary.splitlines() if "plan (stage share" in line)
    assert re.search(r"0:versions 7%=37s 1:build 28%=151s 2:correctness 20%=108s 3:tests_gpu 15%=81s "
                     r"4:sanitizer 15%=81s 5:bench 15%=81s", plan), plan
    assert "budget 540s" in summary
    assert re.search(r"^# \d+/\d+ lowered .*: 0 failed", (tmp_path / "versions.log").read_text(), re.M)
    assert "dry run: would run" in (tmp_path / "build.log").read_text()
    assert "dry run: skipped (needs a GPU)" in (tmp_path / "sanitizer.log").read_text()
    assert "compute-sanitizer:" in summary
    assert re.search(r"tests_gpu: pytest-xdist (absent, serial|, \d+ processes)", summary)
    assert "file check: PASS" in summary

    recs, checks, final = _records((tmp_path / "correctness.jsonl").read_text().splitlines())
    assert recs[0].get("header") and recs[0]["extension_C"] == "loaded", recs[0]
    assert len(checks) > 20 and len(final) == 1
    assert final[0]["failed"] == 0 and final[0]["errors"] == 0 and final[0]["checks"] == len(checks)
    assert {c["backend"] for c in checks} == {"cpu"} and {c["dtype"] for c in checks} == {"bf16"}

    entries = list(tmp_path.iterdir())
    assert len(entries) <= 8, [p.name for p in entries]
    assert not [p for p in entries if p.is_dir()], "OUT must stay flat"
    assert (tmp_path / "bench_results.tar.gz").stat().st_size > 0


def test_a_stage_without_a_build_builds_it_first_once(tmp_path):
    """SKIP_BUILD=1 (or a resume without stage 1) on a machine without the extension: the first stage
    that needs it builds it within its own cap; later stages reuse that build."""
    summary, lines = _dry_run(tmp_path, STAGES="1,2,4", SKIP_BUILD="1", GPU_CHECK_ASSUME_NO_BUILD="1")
    assert "stage 1 build: not run (SKIP_BUILD=1)" in summary
    first = _line_of("stage 2 correctness", [ln for ln in summary.splitlines() if "no built extension" in ln])
    assert first == 0
    build = _line_of("stage 2 correctness/build_first", lines)
    assert "rc=0" in lines[build] and build < _line_of("stage 2 correctness/warmup", lines)
    assert "stage 2 correctness/build_first -> extension imse_kernels._C: yes" in summary
    assert "stage 4 sanitizer: no built extension" not in summary  # built once, in stage 2
    build_runs = [ln for ln in (tmp_path / "build.log").read_text().splitlines() if ln.startswith("dry run: would run")]
    assert summary.count("would run") == 0 and len(build_runs) == 1  # the stage header echoes the command too
    assert not [ln for ln in lines if "stage 0" in ln or "stage 3" in ln or "stage 5" in ln]


def test_stage_caps_follow_the_budget(tmp_path):
    """Caps are shares of GPU_CHECK_BUDGET_S; a stage selected alone gets the whole budget; a budget
    too small skips the steps and says so, and the script still ends with the file check."""
    summary, lines = _dry_run(tmp_path, STAGES="4", GPU_CHECK_BUDGET_S="300")
    assert "4:sanitizer 15%=45s" in summary
    summary, lines = _dry_run(tmp_path, STAGES="0,5", GPU_CHECK_BUDGET_S="8")
    assert "SKIPPED (cap" in lines[_line_of("stage 0 versions/compile_check", lines)]
    assert "SKIPPED (cap" in lines[_line_of("stage 5 bench/bf16", lines)]
    assert "file check: PASS" in summary and "python " in summary


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
