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

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "triton_compile_check.py")


def test_every_kernel_config_lowers_for_sm80_and_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, TOOL], env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"^(ok |BIG|ERR)", ln)]
    bad = [ln for ln in lines if not ln.startswith("ok ")]
    assert not bad, "\n".join(bad) + "\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = subprocess.run([sys.executable, TOOL, "--list"], env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert len(lines) == len(listed.stdout.splitlines()) >= 30
    for arch in ("sm_80", "sm_90"):
        for kernel in ("chain", "scaled_matmul", "recomposed_ds"):
            assert any(f"{kernel} {arch} " in ln for ln in lines), f"{kernel} not lowered for {arch}"
