"""Imports point one way (docs/design.md §3): `tools/import_graph.py` finds no edge pointing back, the
benchmarks and checks included, and no import cycle among their scripts."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _graph(root):
    return subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), str(root)],
                          capture_output=True, text=True, timeout=120)


def test_import_graph_has_no_edge_pointing_the_wrong_way():
    proc = _graph(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^\d+ edges, 0 pointing the wrong way, 0 import cycles among the scripts$", proc.stdout, re.M)
    # the clients are part of the graph: their edges into the library and the imports between their scripts
    assert re.search(r"^ +benchmarks -> root ", proc.stdout, re.M)
    assert re.search(r"^ +checks -> root ", proc.stdout, re.M)
    assert re.search(r"^benchmarks/: [1-9]\d* imports between its scripts, 0 cycles$", proc.stdout, re.M)


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


def _tree(tmp_path, files: dict):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return _graph(tmp_path)


def test_import_graph_flags_a_cycle_between_benchmark_scripts(tmp_path):
    """The benchmarks as they are, plus report.py importing layer_bench inside a function (as it once did):
    a cycle, reported with its path, and the check fails."""
    shutil.copytree(REPO / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("results"))
    (tmp_path / "imse_kernels").mkdir()
    (tmp_path / "imse_kernels" / "__init__.py").write_text("")
    assert _graph(tmp_path).returncode == 0
    with open(tmp_path / "benchmarks" / "report.py", "a") as f:
        f.write("\n\ndef _late():\n    import layer_bench\n    return layer_bench\n")
    proc = _graph(tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "CYCLE benchmarks/: layer_bench -> report -> layer_bench" in proc.stdout
    assert "1 import cycles among the scripts" in proc.stdout


def test_import_graph_flags_a_longer_cycle_in_checks(tmp_path):
    proc = _tree(tmp_path, {"imse_kernels/__init__.py": "", "checks/a.py": "import b\n", "checks/b.py": "import c\n",
                            "checks/c.py": "from a import x\n", "checks/d.py": "import a\n"})
    assert proc.returncode == 1 and "CYCLE checks/: a -> b -> c -> a" in proc.stdout, proc.stdout


def test_import_graph_flags_a_client_edge_pointing_the_wrong_way(tmp_path):
    files = {"imse_kernels/__init__.py": "", "imse_kernels/ops/__init__.py": "", "imse_kernels/eval/__init__.py": "",
             "benchmarks/bench_common.py": "", "benchmarks/bench.py": "", "checks/check.py": ""}
    planted = [("imse_kernels/ops/__init__.py", "import bench_common\n", "ops -> benchmarks"),  # library uses a client
               ("checks/check.py", "import bench_common\n", "checks -> benchmarks"),  # one client uses the other
               ("benchmarks/bench.py", "import check\n", "benchmarks -> checks"),
               ("benchmarks/bench.py", "from imse_kernels.eval import report\n", "benchmarks -> eval"),
               ("checks/check.py", "from imse_kernels.eval.report import table\n", "checks -> eval")]
    assert _tree(tmp_path / "clean", files).returncode == 0
    for i, (rel, text, edge) in enumerate(planted):
        proc = _tree(tmp_path / str(i), {**files, rel: text})
        assert proc.returncode == 1 and "VIOLATION" in proc.stdout and edge in proc.stdout, (edge, proc.stdout)
        assert "1 pointing the wrong way" in proc.stdout
