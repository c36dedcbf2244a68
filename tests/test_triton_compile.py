"""Compile-only check: every Triton kernel configuration is lowered to a cubin for sm_80 and sm_90
on this CPU-only machine (`triton.compile` with a `GPUTarget`), and fits the shared memory of each.

The interpreter runs the numerics elsewhere but checks no types, layouts or resource limits; this
catches those. It runs in a subprocess with TRITON_INTERPRET=0, because this test process imported
triton in interpreter mode.
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import imse_kernels  # noqa: E402
from imse_kernels.triton_kernels import compile_check  # noqa: E402


def test_every_kernel_config_lowers_for_sm80_and_sm90():
    root = os.path.dirname(os.path.dirname(os.path.abspath(imse_kernels.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "imse_kernels.triton_kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"^(ok |BIG|ERR)", ln)]
    bad = [ln for ln in lines if not ln.startswith("ok ")]
    assert not bad, "\n".join(bad) + "\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = compile_check.jobs()
    assert len(lines) == len(expected) >= 30
    for arch in ("sm_80", "sm_90"):
        for kernel in ("chain", "scaled_matmul", "recomposed_ds"):
            assert any(f"{kernel} {arch} " in ln for ln in lines), f"{kernel} not lowered for {arch}"
