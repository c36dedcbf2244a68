"""Every bad input of the data/checkpoint layer, run through the `imse-eval` command, and what the user gets.

    python tools/bad_inputs_table.py [OUT_PREFIX]   # default benchmarks/results/bad_inputs_messages

Writes the files each case names (tests/bad_input_cases.py) into a temporary folder, runs
`python -m imse_kernels.eval <options>` for each as its own process, and writes OUT_PREFIX.json and
OUT_PREFIX.md: the input, the options (the shared ones left out, temporary paths shown as <tmp>), the exit
status, the number of lines on stderr, whether a traceback appeared, and the message: the error line, the
warning, or what ran. tests/eval/test_eval_bad_inputs.py checks the same cases through `main()`.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bad_input_cases import FAST, make_cases, write_files  # noqa: E402


def shown(argv: list, tmp: str) -> str:
    """The options a reader needs: the shared FAST ones left out, temporary paths as <tmp>."""
    out, i = [], 0
    while i < len(argv):
        opt = next((o for o in FAST if tuple(argv[i:i + len(o)]) == o), None)
        if opt is not None:
            i += len(opt)
            continue
        out.append(argv[i].replace(tmp, "<tmp>"))
        i += 1
    return " ".join(out)


def message(rc: int, err: str, out: Path) -> str:
    """The error line; or for a run, the corruptions it ran and its warnings and notes."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc != 0:
        return next((ln for ln in reversed(lines) if ln.startswith("imse-eval: error:")), lines[-1] if lines else "")
    said = [ln for ln in lines if ln.startswith(("warning", "note"))]
    meta = json.loads((out / "results.json").read_text())["meta"]
    ran = f"runs ({', '.join(meta['corruptions'])}; {meta['images_per_domain']} images per domain)"
    return ran + "; " + (" / ".join(said) if said else "no warning")


def main(out_prefix: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "files"
        write_files(root)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
               "HF_HUB_CACHE": str(Path(tmp) / "hf")}
        for i, case in enumerate(make_cases(root)):
            out = Path(tmp) / f"out{i}"
            argv = case.argv + ["--output-dir", str(out)]
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "imse_kernels.eval", *argv], capture_output=True, text=True,
                               env={**env, **case.env}, cwd=tmp, timeout=600)
            err = p.stderr
            rows.append({"input": case.name, "options": shown(case.argv, tmp), "exit": p.returncode,
                         "expected_exit": case.rc, "stderr_lines": len([ln for ln in err.splitlines() if ln.strip()]),
                         "traceback": "Traceback" in err, "stderr_bytes": len(err.encode()),
                         "message": message(p.returncode, err, out).replace(tmp, "<tmp>"),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{rows[-1]['exit']} {case.name}: {rows[-1]['message'][:160]}", flush=True)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(out_prefix + ".json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    md = ["Every bad input through `python -m imse_kernels.eval` (`python tools/bad_inputs_table.py`); every run "
          "also had `--method source --batch-size 4 --no-progress --no-plot --threads 1 --output-dir <tmp>/outN` "
          "unless it names its own. stderr lines: all lines on stderr (progress notes included).", "",
          "| input | options | exit | stderr lines | traceback | message |", "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['input']} | `{r['options']}` | {r['exit']} | {r['stderr_lines']} | "
           f"{'yes' if r['traceback'] else 'no'} | {r['message'].replace('|', '/')} |" for r in rows]
    Path(out_prefix + ".md").write_text("\n".join(md) + "\n")
    wrong = [r["input"] for r in rows if r["exit"] != r["expected_exit"] or r["traceback"]]
    print(f"{len(rows)} inputs; unexpected exit status or traceback: {wrong or 'none'}")
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "benchmarks" / "results" / "bad_inputs_messages"))
