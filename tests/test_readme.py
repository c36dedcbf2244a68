"""The README's quickstart runs as written, and CI runs the README's test command verbatim."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quickstart_runs():
    code = _blocks("python")[0]
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    model = namespace["model"]
    assert not any(type(m).__name__ == "FusedSpectralLinear" for m in model.modules())
    assert len(namespace["names"]) == 12 * 4  # vit_tiny: 12 blocks x (qkv, proj, fc1, fc2)


def test_ci_runs_readme_test_command():
    test_command = _blocks("bash")[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.replace("pip install", "python -m pip install").replace("&& pytest", "&& python -m pytest") in ci
