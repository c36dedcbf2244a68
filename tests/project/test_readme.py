"""The README's quickstart runs as written, and CI runs the README's test command verbatim."""
import pathlib
import re
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quickstart_runs():
    code = _blocks("python")[0]
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    model = namespace["model"]
    assert not any(type(m).__name__ == "FusedSpectralLinear" for m in model.modules())
    assert len(namespace["names"]) == 12 * 4  # vit_tiny: 12 blocks x (qkv, proj, fc1, fc2)


def test_many_streams_example_runs():
    code = next(b for b in _blocks("python") if "stream_codes" in b)
    namespace = {}
    exec(compile(code, "README many streams", "exec"), namespace)
    tables = namespace["tables"]
    assert "streams" in namespace
    assert len(tables) == 12 * 4 and all(t.shape[0] == 4 for t in tables)
    for t in tables:
        assert torch.equal(t.grad[2], torch.zeros_like(t.grad[2]))
        assert t.grad[[0, 1, 3]].abs().sum() > 0


def test_ci_runs_readme_test_command_in_a_fresh_venv():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from readme_command import command
    finally:
        sys.path.pop(0)
    test_command = command("test")
    assert test_command == _blocks("bash")[1].strip()  # the second block at the top of the README
    assert command("main") == _blocks("bash")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m venv" in ci or "python3 -m venv" in ci
    assert "mktemp -d" in ci and 'source "$VENV/bin/activate"' in ci
    assert '"$(python tools/readme_command.py test)"' in ci and 'bash -euo pipefail -c "$TEST_COMMAND"' in ci


def test_readme_command_finds_the_block_under_its_heading():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from readme_command import command
    finally:
        sys.path.pop(0)
    text = "intro\n```bash\nnot this\n```\n**Run the tests** (x):\n\n```bash\npytest -q\n```\n"
    assert command("test", text) == "pytest -q"
    with pytest.raises(SystemExit, match="Run the main job"):
        command("main", text)
