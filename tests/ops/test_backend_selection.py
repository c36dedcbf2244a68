"""Backend selection, the extension fallback, and `python -m imse_kernels`."""
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import factors

import imse_kernels
from imse_kernels import _extension, spectral_linear, use_backend
from imse_kernels.backends import requested_backend, resolve_backend


def test_available_backends_lists_torch_and_reasons():
    status = imse_kernels.backend_status()
    assert set(status) == {"torch", "cpu", "triton", "cuda"}
    assert "torch" in imse_kernels.available_backends()
    for name, reason in status.items():
        assert (name in imse_kernels.available_backends()) == (reason is None)
        assert reason is None or isinstance(reason, str) and reason


def test_env_and_context_selection(monkeypatch):
    monkeypatch.setenv("IMSE_BACKEND", "torch")
    assert resolve_backend(torch.device("cpu")).name == "torch"
    with use_backend("auto"):
        assert requested_backend() == "auto"
        expected = "cpu" if "cpu" in imse_kernels.available_backends() else "torch"
        assert resolve_backend(torch.device("cpu")).name == expected
    assert requested_backend() == "torch"


def test_backend_really_switches(monkeypatch):
    """The backend named is the one that runs: a spy on the torch backend sees only its calls."""
    from imse_kernels.backends import get_backend

    calls = []
    tb = get_backend("torch")
    monkeypatch.setattr(tb, "factorized_forward", lambda *a: calls.append(1) or type(tb).factorized_forward(tb, *a))
    U, s, Vh, b = factors(8, 6, 5)
    from imse_kernels.ops import force_route

    with force_route("factorized"):
        with use_backend("torch"):
            spectral_linear(torch.randn(2, 8), U, s, Vh, b)
        if "cpu" in imse_kernels.available_backends():
            with use_backend("cpu"):
                spectral_linear(torch.randn(2, 8), U, s, Vh, b)
    assert calls == [1]


def test_extension_built_against_other_torch_warns_and_falls_back(monkeypatch):
    from imse_kernels import _build_info

    monkeypatch.setattr(_extension, "_status", {})
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.0-other")
    with pytest.warns(UserWarning, match="compiled against torch 0.0.0-other"):
        assert _extension.load("_C") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second query does not warn again
        assert "0.0.0-other" in _extension.reason("_C")


def test_python_m_imse_kernels_reports_backends():
    out = subprocess.run([sys.executable, "-m", "imse_kernels"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout and "backends:" in out.stdout
    for name in ("torch", "cpu", "triton", "cuda"):
        assert f"  {name}" in out.stdout
