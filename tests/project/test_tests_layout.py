"""The tests' own layout (tests/conftest.py): every test module in its layer's folder under a basename no other
test module has, no folder a package, and no module importing a test module (what they share is in the
non-test modules at the top of tests/, tests/helpers.py first)."""
import re
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
FOLDERS = ("ops", "layers", "tta", "eval", "gpu", "svf", "project")
# An import of a test module, in code or in the source of a child process held in a string.
IMPORTS_A_TEST = re.compile(r"^[\s\"']*(?:from\s+test_\w+\s+import|import\s+test_\w+)", re.M)


def layout_problems(root: Path) -> list:
    """What breaks the layout under the tests folder `root`, one line per problem."""
    problems, by_name = [], defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if path.name == "__init__.py":
            problems.append(f"{rel}: the test folders are not packages (pytest imports modules by basename)")
        if path.name.startswith("test_"):
            by_name[path.name].append(rel)
            if len(rel.parts) != 2 or rel.parts[0] not in FOLDERS:
                problems.append(f"{rel}: a test module belongs in one of tests/{{{','.join(FOLDERS)}}}/")
        for m in IMPORTS_A_TEST.finditer(path.read_text()):
            problems.append(f"{rel}: {m.group(0).strip()!r}: import from tests/helpers.py, not from a test module")
    problems += [f"{name}: in {', '.join(map(str, rels))}" for name, rels in by_name.items() if len(rels) > 1]
    return problems


def test_the_tests_are_laid_out_by_layer():
    assert layout_problems(TESTS) == []
    assert {p.parent.name for p in TESTS.rglob("test_*.py")} == set(FOLDERS)


def test_the_check_finds_each_kind_of_problem(tmp_path):
    (tmp_path / "ops").mkdir()
    (tmp_path / "tta").mkdir()
    (tmp_path / "helpers.py").write_text("def tiny_vit():\n    pass\n")
    (tmp_path / "ops" / "test_a.py").write_text("from helpers import tiny_vit\n")
    assert layout_problems(tmp_path) == []
    (tmp_path / "test_flat.py").write_text("")
    (tmp_path / "tta" / "test_a.py").write_text("")
    (tmp_path / "tta" / "__init__.py").write_text("")
    (tmp_path / "tta" / "test_b.py").write_text("im" + "port test_flat\nSCRIPT = '''\nfr" + "om test_a import x\n'''\n")
    assert layout_problems(tmp_path) == [
        "test_flat.py: a test module belongs in one of tests/{ops,layers,tta,eval,gpu,svf,project}/",
        "tta/__init__.py: the test folders are not packages (pytest imports modules by basename)",
        "tta/test_b.py: 'import test_flat': import from tests/helpers.py, not from a test module",
        "tta/test_b.py: 'from test_a import': import from tests/helpers.py, not from a test module",
        "test_a.py: in ops/test_a.py, tta/test_a.py",
    ]


def test_only_the_gpu_mark_skips_a_test_on_a_cpu_machine(monkeypatch):
    """Every test under tests/gpu/ has the folder's name among its keywords; the CUDA emulation, the fallback
    guard, the Triton lowering and the GPU check's dry run run on the CPU all the same."""
    import conftest
    import torch

    class Item:
        keywords = {"gpu": 1, "test_x": 1}

        def __init__(self, marked):
            self.marked, self.added = marked, []

        def get_closest_marker(self, name):
            return object() if self.marked and name == "gpu" else None

        def add_marker(self, mark):
            self.added.append(mark)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    items = [Item(marked=True), Item(marked=False)]
    conftest.pytest_collection_modifyitems(None, items)
    assert [len(item.added) for item in items] == [1, 0]
