"""Every bad input of the data and checkpoint layer through `imse-eval`'s `main()` (tests/bad_input_cases.py): an
error exits with status 2 and one line naming the file and the fix, never a traceback; the inputs that load,
or load with a warning, run and say so. tools/bad_inputs_table.py runs the same cases as processes."""
from pathlib import Path

import pytest
from bad_input_cases import make_cases, write_files

from imse_kernels.eval.__main__ import main

CASES = {c.name: c for c in make_cases(Path("/nonexistent"))}  # the names; the files are written per module


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    write_files(root)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, root, tmp_path, capsys, monkeypatch):
    case = next(c for c in make_cases(root) if c.name == name)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty local cache
    rc = main(case.argv + ["--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == case.rc, err
    assert "Traceback" not in err
    if case.kind == "error":
        lines = err.strip().splitlines()
        assert lines[-1].startswith("imse-eval: error: ") and sum("error" in ln for ln in lines) == 1, err
        assert not (tmp_path / "out").exists(), "nothing ran"
        text = lines[-1]
    else:
        assert (tmp_path / "out" / "results.json").is_file()
        text = err + out
    for word in case.expect:
        assert word in text, (word, text)
    if case.kind == "warning":
        assert "warning" in err
    if case.kind == "loads":
        assert "warning" not in err, err
