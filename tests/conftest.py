"""Shared test setup and fixtures (shared functions: tests/helpers.py).

Triton kernels run on the CPU through the interpreter unless the caller set TRITON_INTERPRET
(the GPU script sets TRITON_INTERPRET=0); it must be set before triton is first imported.

The test modules sit in one folder per layer of the library (ops, layers, tta, eval, gpu, svf, project);
their basenames are unique (pytest imports each by its basename), and the modules they share are here, at
the top of tests/, which this file puts on sys.path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the mark, not the keyword: tests/gpu/ is a keyword too
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the whole module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    same reduction order in every run and child process, so results are bitwise equal; small models on few
    cores run faster; and fork is safe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A cache folder for imse-eval's embedded digits model, shared by a module's tests (it trains once)."""
    pytest.importorskip("sklearn")  # the embedded data set
    return str(tmp_path_factory.mktemp("imse_cache"))


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo's caches emptied before and after the test, so that graph counts start at zero."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
