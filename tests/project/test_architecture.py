"""Imports point one way (docs/design.md §3): `tools/import_graph.py` finds no edge pointing back."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_graph_has_no_edge_pointing_the_wrong_way():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), str(REPO)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 pointing the wrong way" in proc.stdout


def test_import_graph_flags_a_backward_edge(tmp_path):
    """The checker can fail: a losses -> ops import is reported."""
    pkg = tmp_path / "imse_kernels"
    (pkg / "losses").mkdir(parents=True)
    (pkg / "ops").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "losses" / "__init__.py").write_text("from ..ops import planner\n")
    (tmp_path / "benchmarks").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "VIOLATION" in proc.stdout and "losses -> ops" in proc.stdout
