"""The ahead-of-time compile check (tools/triton_compile_check.py): the Triton kernels are lowered to
cubins for sm_80 and sm_90 on this CPU-only machine as the JIT will specialise them (launch arguments
captured from the backend's own calls, triton's own binder), and fit each architecture's shared
memory and registers without spilling. It runs in subprocesses with TRITON_INTERPRET=0, because this
test process imported triton in interpreter mode. The check must be able to fail: a spilling
configuration given on the command line fails it."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "triton_compile_check.py")
LINE = re.compile(r"^(ok~?|SPILL|BIG|REGS|ERR)\s+(\w+) (sm_\d+) (\w+) (\S+)")


def _env():
    return dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(*args, timeout=1500):
    proc = subprocess.run([sys.executable, TOOL, *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, [m for m in map(LINE.match, proc.stdout.splitlines()) if m]


def test_default_configs_lower_for_sm80_and_sm90_without_spills():
    proc, lines = _run("--tiers", "defaults", "--dtypes", "bf16,fp32", "--shapes", "vit,odd")
    bad = [m.group(0) for m in lines if not m.group(1).startswith("ok")]
    assert not bad and proc.returncode == 0, "\n".join(bad) + proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = subprocess.run([sys.executable, TOOL, "--list", "--tiers", "defaults", "--dtypes", "bf16,fp32",
                             "--shapes", "vit,odd"], env=_env(), capture_output=True, text=True, timeout=600)
    n_jobs = int(re.search(r"(\d+) unique specialisations", listed.stdout).group(1))
    assert len(lines) == n_jobs >= 40
    for arch in ("sm_80", "sm_90"):
        for kernel in ("chain", "scaled_matmul", "recomposed_ds"):
            assert any(m.group(2) == kernel and m.group(3) == arch for m in lines), f"{kernel} not lowered for {arch}"


def test_a_spilling_configuration_fails_the_check():
    spilling = "chain:bf16:BLOCK_M=64,BLOCK_N=256,BLOCK_R=64,BLOCK_K=64,GROUP_M=8,w1,s1"
    proc, lines = _run("--tiers", "none", "--extra-config", spilling, "--arch", "90", "--dtypes", "bf16",
                       "--shapes", "vit")
    assert lines and all(m.group(1) == "SPILL" for m in lines), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1
    assert "# FAILED chain sm_90 bf16 k64_m64_n256_r64_group_m8_w1s1" in proc.stdout


SPECIALISATION = r"""
import sys
sys.path.insert(0, {tools!r})
import triton_compile_check as t
for shape in ("vit", "odd", "n1"):
    jobs = t.collect({{"defaults"}}, [90], ["bf16"], [shape], [])
    job = next(j for j in jobs if j.kernel == "chain" and "fwd@" + shape in j.uses)
    options, signature, constexprs, attrs = t._specialise(job.launch, 90)
    names = t._KERNEL_FUNCTIONS["chain"].arg_names
    divisible = sorted(names[k[0]] for k, v in attrs.items() if "tt.divisibility" in str(v))
    declared = {{p.name for p in t._KERNEL_FUNCTIONS["chain"].params if p.is_constexpr}}
    ones = sorted(names[k[0]] for k, v in constexprs.items() if v == 1 and names[k[0]] not in declared)
    print(shape, "divisible=" + ",".join(divisible), "ones=" + ",".join(ones))
"""


def test_the_check_specialises_as_the_jit_does():
    """ViT sizes are 16-divisible and their pointers 16-byte aligned; odd sizes and a misaligned x are
    not; a stride or a row count of 1 becomes a constant: each is its own specialisation."""
    proc = subprocess.run([sys.executable, "-c", SPECIALISATION.format(tools=os.path.join(ROOT, "tools"))],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = {line.split()[0]: dict(kv.split("=") for kv in line.split()[1:]) for line in proc.stdout.splitlines()}
    vit, odd, n1 = (set(spec[s]["divisible"].split(",")) - {""} for s in ("vit", "odd", "n1"))
    assert {"a_ptr", "b1_ptr", "b2_ptr", "out_ptr", "K", "R", "N", "stride_am"} <= vit
    assert "a_ptr" not in odd and "K" not in odd and "stride_am" not in odd and "M" in vit and "M" not in odd
    assert "stride_b1k" in spec["vit"]["ones"].split(",")  # Vhᵀ's unit stride, folded into a constant
    assert "M" in spec["n1"]["ones"].split(",")


EVIDENCE = r"""
import sys
sys.path.insert(0, {tools!r})
import triton_compile_check as t
for job in t.collect({{"candidates"}}, [90], ["fp32"], ["vit"], []):
    print(job.kernel, job.config, job.flags, job.status_note or "-")
"""


def test_the_tiles_of_a_kernel_left_without_any_are_still_lowered_as_evidence():
    """fp32 IEEE per-sample codes on sm_90: tuning.DROPPED removes every `chain` tile, so the backend offers
    the ATen path alone; the check still lowers each dropped tile for each coded launch, marked `dropped`
    (its failures do not count), so the tables keep the evidence for the drop."""
    from imse_kernels.triton_kernels import tuning

    dropped = tuning.dropped("chain", 90, fp32=True, precision="ieee", codes=True, aligned=True)
    assert tuning.candidates("chain", 90, fp32=True, precision="ieee", codes=True, aligned=True) == []
    assert len(dropped) == len(tuning.CANDIDATES["chain"][90])
    proc = subprocess.run([sys.executable, "-c", EVIDENCE.format(tools=os.path.join(ROOT, "tools"))],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [line.split() for line in proc.stdout.splitlines()]
    coded = [j for j in jobs if j[0] == "chain" and "INDEXED" in j[2]]
    assert {j[1] for j in coded} == dropped and all(j[3] == "dropped" for j in coded), coded
    assert {j[2] for j in coded} == {"HAS_BIAS,SAVE_H,INDEXED", "DS,INDEXED", "INDEXED"}
    assert [j for j in jobs if j[3] == "-"], "the offered candidates count"
