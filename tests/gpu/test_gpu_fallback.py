"""A failing GPU backend cannot take a model down: under `auto` it is checked at first use of a shape,
and a kernel that raises or returns wrong values is disabled with one warning while the call completes
on the next backend. The faults are injected on the CPU: the Triton backend runs there through
TRITON_INTERPRET=1 (conftest), put at the head of auto's CPU chain as it heads the CUDA one."""
import json
import warnings

import pytest
import torch
from helpers import factors, oracle

import imse_kernels as ik
from imse_kernels import backends
from imse_kernels.backends import fallback
from imse_kernels.backends.base import SpectralBackend
from imse_kernels.backends.torch_backend import TorchBackend
from imse_kernels.precision import tf32_matmul_enabled

pytest.importorskip("triton")


@pytest.fixture
def gpu_like_chain(monkeypatch):
    """auto on the CPU behaves as on a GPU: triton first and guarded, then cpu, then torch."""
    if "triton" not in ik.available_backends():
        pytest.skip("triton backend unavailable")
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.setattr(backends, "_chains", {})
    monkeypatch.delenv("IMSE_BACKEND", raising=False)
    fallback.reset()
    yield backends._instances["triton"]
    fallback.reset()


def _call(n=7, d_in=24, d_out=20, r=12, grad=True):
    U, s, Vh, b = factors(d_in, d_out, r)
    x = torch.randn(n, d_in, requires_grad=grad)
    s.requires_grad_(grad)
    y = ik.spectral_linear(x, U, s, Vh, b)
    return x, U, s, Vh, b, y


def _expect_oracle(x, U, s, Vh, b, y):
    torch.testing.assert_close(y.double(), oracle(x, U, s, Vh, b), rtol=1e-5, atol=1e-5)


def test_a_healthy_guarded_backend_is_verified_once_and_then_runs_unguarded(gpu_like_chain, monkeypatch):
    calls = {"reference": 0}
    real = TorchBackend.factorized_forward

    def counting(self, *args):
        calls["reference"] += 1
        return real(self, *args)

    monkeypatch.setattr(TorchBackend, "factorized_forward", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            with torch.no_grad():
                x, U, s, Vh, b, y = _call(grad=False)
            _expect_oracle(x, U, s, Vh, b, y)
    assert calls["reference"] == 1  # the one-time result check, then the kernel alone
    assert fallback.disabled_backends() == {}
    assert backends.serving_backend(torch.device("cpu")) == "triton"


@pytest.mark.parametrize("fault", ["raises", "out_of_resources", "wrong_values", "non_finite"])
def test_a_failing_forward_kernel_falls_back_with_the_right_result(gpu_like_chain, monkeypatch, fault):
    def broken(self, x, U, s, Vh, bias, save_h):
        if fault == "raises":
            raise RuntimeError("simulated launch failure")
        if fault == "out_of_resources":
            from triton.runtime.errors import OutOfResources
            raise OutOfResources(300000, 232448, "shared memory")
        y, h = TorchBackend.factorized_forward(self, x, U, s, Vh, bias, save_h)
        return (y * 1.01 if fault == "wrong_values" else y.fill_(float("nan"))), h

    monkeypatch.setattr(type(gpu_like_chain), "factorized_forward", broken)
    with pytest.warns(RuntimeWarning, match="triton backend is disabled for 'auto'") as record:
        x, U, s, Vh, b, y = _call()
    _expect_oracle(x, U, s, Vh, b, y)
    assert len([w for w in record if "disabled" in str(w.message)]) == 1
    assert "triton" in fallback.disabled_backends()
    assert backends.serving_backend(torch.device("cpu")) == "cpu"
    y.sum().backward()  # the backward runs on the backend that serves now
    torch.testing.assert_close(s.grad.double(), ((x.detach().double() @ Vh.double().t())
                                                 * (torch.ones(7, 20, dtype=torch.float64) @ U.double())).sum(0),
                               rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are quiet
        _expect_oracle(*_call())


def test_a_failing_backward_kernel_falls_back_and_the_gradients_are_right(gpu_like_chain, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("simulated illegal instruction")

    monkeypatch.setattr(type(gpu_like_chain), "factorized_backward", broken)
    x, U, s, Vh, b, y = _call()
    g = torch.randn_like(y)
    with pytest.warns(RuntimeWarning, match="factorized_backward"):
        y.backward(g)
    h, t = x.detach().double() @ Vh.double().t(), g.double() @ U.double()
    torch.testing.assert_close(s.grad.double(), (h * t).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), (t * s.detach().double()) @ Vh.double(), rtol=1e-5, atol=1e-5)


def test_an_explicitly_requested_backend_still_raises(gpu_like_chain, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(type(gpu_like_chain), "factorized_forward", broken)
    with ik.use_backend("triton"), pytest.raises(RuntimeError, match="simulated launch failure"):
        _call()
    assert fallback.disabled_backends() == {}


class _Fake(SpectralBackend):
    def __init__(self, name, fault):
        self.name, self.fault, self.calls = name, fault, 0

    def supports(self, device):
        return True

    def recompose(self, U, s, Vh):
        self.calls += 1
        if self.fault == "raises":
            raise RuntimeError(f"{self.name} broke")
        return TorchBackend().recompose(U, s, Vh) * (1.0 if self.fault is None else 1.5)


def test_the_chain_walks_triton_then_cuda_then_torch():
    fallback.reset()
    fakes = {"triton": _Fake("triton", "raises"), "cuda": _Fake("cuda", "wrong"), "torch": TorchBackend()}
    chain = fallback.FallbackChain(("triton", "cuda", "torch"), fakes.get, frozenset({"triton", "cuda"}),
                                   fakes["torch"])
    U, s, Vh, _ = factors(9, 11, 5, bias=False)
    with pytest.warns(RuntimeWarning) as record:
        W = chain.recompose(U, s, Vh)
    torch.testing.assert_close(W, TorchBackend().recompose(U, s, Vh))
    assert set(fallback.disabled_backends()) == {"triton", "cuda"}
    assert "triton broke" in fallback.disabled_backends()["triton"]
    assert "off by" in fallback.disabled_backends()["cuda"]
    assert len(record) == 2 and chain.serving(U.device).name == "torch"
    chain.recompose(U, s, Vh)
    assert fakes["triton"].calls == 1 and fakes["cuda"].calls == 1  # disabled backends are not tried again
    fallback.reset()


def test_check_result_catches_wrong_shapes_missing_outputs_and_values():
    a = torch.randn(4, 3)
    fallback.check_result((a, None), (a.clone(), None), torch.float32)
    for bad, match in (((a[:2], None), "shape"), ((a, a), "unexpected"), ((None, None), "missing"),
                       ((a + 1, None), "off by")):
        with pytest.raises(fallback.BackendCheckError, match=match):
            fallback.check_result(bad, (a, None), torch.float32)


@pytest.fixture
def restore_precision():
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield
    matmul.fp32_precision, torch.backends.fp32_precision = saved[0], saved[1]


def test_tf32_is_read_through_the_current_precision_api(restore_precision):
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"
    assert tf32_matmul_enabled()
    with pytest.raises(RuntimeError):
        matmul.allow_tf32  # noqa: B018 - what the legacy read does on this torch once the new API is set
    matmul.fp32_precision = "ieee"
    assert not tf32_matmul_enabled()
    torch.backends.fp32_precision, matmul.fp32_precision = "tf32", "none"  # "none" inherits the global setting
    assert tf32_matmul_enabled()


def test_tf32_falls_back_to_the_legacy_flag_on_an_older_torch(monkeypatch):
    class LegacyMatmul:  # a torch without fp32_precision
        allow_tf32 = True

    monkeypatch.setattr(torch.backends.cuda, "matmul", LegacyMatmul())
    assert tf32_matmul_enabled()
    LegacyMatmul.allow_tf32 = False
    assert not tf32_matmul_enabled()


def test_route_timing_is_opt_in(monkeypatch):
    from imse_kernels.triton_kernels import tuning

    monkeypatch.delenv("IMSE_TRITON_TUNE", raising=False)
    monkeypatch.setattr(tuning.runtime, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not tuning.enabled(torch.device("cuda"))
    monkeypatch.setenv("IMSE_TRITON_TUNE", "1")
    assert tuning.enabled(torch.device("cuda"))


def test_per_sample_codes_are_guarded_too(gpu_like_chain, monkeypatch):
    """The indexed primitives go through the chain as well: a wrong result is caught at first use."""
    def broken(self, x, U, S, Vh, bias, index, save_h):
        y, h = SpectralBackend.indexed_forward(self, x, U, S, Vh, bias, index, save_h)
        return y * 1.01, h

    monkeypatch.setattr(type(gpu_like_chain), "indexed_forward", broken)
    U, _, Vh, b = factors(24, 20, 12)
    S = torch.rand(3, 12) + 0.5
    x = torch.randn(5, 24)
    index = torch.tensor([2, 0, 2, 1, 1])
    with pytest.warns(RuntimeWarning, match="triton backend is disabled for 'auto'"):
        y = ik.spectral_linear(x, U, S, Vh, b, index=index)
    ref = torch.stack([oracle(x[n:n + 1], U, S[index[n]], Vh, b)[0] for n in range(5)])
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert "indexed_forward" in fallback.disabled_backends()["triton"]


# ------------------------------------------------------------------------------------------------
# The promise made exact: signatures with layout, NaN handling, the bf16 bound, a failing reference,
# and a fault that poisons the device context.

@pytest.fixture
def faults_file(tmp_path, monkeypatch):
    path = tmp_path / "backend_faults.json"
    monkeypatch.setenv("IMSE_BACKEND_FAULTS", str(path))
    fallback.reset()
    yield path
    fallback.reset()


def _wrong_when(condition):
    """A forward that is right except when condition(x) holds."""
    def forward(self, x, U, s, Vh, bias, save_h):
        y, h = TorchBackend.factorized_forward(self, x, U, s, Vh, bias, save_h)
        return (y * 1.5 if condition(x) else y), h
    return forward


@pytest.mark.parametrize("layout", ["strided", "misaligned"])
def test_a_new_layout_is_a_new_signature_checked_at_first_use(gpu_like_chain, monkeypatch, layout):
    """Strides, storage offset and 16-byte alignment select other Triton specialisations and CUDA code
    paths: a kernel wrong only for that layout is caught although the shape was verified before."""
    chain = backends.resolve_backend(torch.device("cpu"))
    U, s, Vh, b = factors(24, 20, 12)
    wrong = (lambda x: not x.is_contiguous()) if layout == "strided" else (lambda x: x.data_ptr() % 16 != 0)
    monkeypatch.setattr(type(gpu_like_chain), "factorized_forward", _wrong_when(wrong))
    x = torch.randn(7, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chain.factorized_forward(x, U, s, Vh, b, False)  # contiguous and aligned: right, verified
    if layout == "strided":
        other = torch.randn(7, 48)[:, ::2]
    else:
        other = torch.randn(7 * 24 + 1)[1:].view(7, 24)
        assert other.is_contiguous() and other.data_ptr() % 16 != 0
    other.copy_(x)
    with pytest.warns(RuntimeWarning, match="triton backend is disabled"):
        y, _ = chain.factorized_forward(other, U, s, Vh, b, False)
    _expect_oracle(x, U, s, Vh, b, y)
    assert "off by" in fallback.disabled_backends()["triton"]


def test_signature_holds_strides_offset_and_alignment():
    a = torch.randn(4, 6)
    sig = fallback._signature((a, True))
    assert sig[0] == ((4, 6), (6, 1), 0, a.data_ptr() % 16 == 0, torch.float32, a.device) and sig[1] is True
    assert fallback._signature((a.t().contiguous().t(),))[0][1] == (1, 4)
    assert fallback._signature((a.view(-1)[1:].view(1, 23),))[0][2:4] == (1, False)


def test_nan_in_both_outputs_keeps_the_backend(gpu_like_chain):
    """NaN propagates as in nn.Linear: a NaN input row is NaN in every backend's output, which is
    agreement, not a failure (before, the NaN error disabled both GPU backends)."""
    x, U, s, Vh, b = torch.randn(7, 24), *factors(24, 20, 12)
    x[3, 5] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ik.spectral_linear(x, U, s, Vh, b)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[[0, 1, 2, 4, 5, 6]]).all()
    assert fallback.disabled_backends() == {}
    assert backends.serving_backend(torch.device("cpu")) == "triton"


def test_check_result_requires_nan_and_inf_at_the_same_positions():
    ref = torch.randn(5, 4)
    ref[1, 2] = float("nan")
    ref[3, 0] = float("inf")
    fallback.check_result(ref.clone(), ref, torch.float32)  # NaN and inf where the reference has them
    for pos, value in (((0, 0), float("nan")), ((1, 2), 0.0), ((3, 0), float("nan")), ((2, 1), -float("inf"))):
        out = ref.clone()
        out[pos] = value
        with pytest.raises(fallback.BackendCheckError, match="NaN|inf"):
            fallback.check_result(out, ref, torch.float32)
    all_nan = torch.full((2, 2), float("nan"))
    fallback.check_result(all_nan.clone(), all_nan, torch.bfloat16)


def test_the_bf16_bound_is_five_unit_roundoffs():
    assert fallback.tolerance(torch.bfloat16) == 5 * 2.0 ** -8 == pytest.approx(1.95e-2, rel=3e-3)
    assert fallback.tolerance(torch.float16) == 5 * 2.0 ** -11
    ref = torch.randn(64, 32, dtype=torch.float64)
    peak = ref.abs().max()
    for rel, passes in ((1.9e-2, True), (2.1e-2, False)):
        out = ref.clone()
        out[7, 3] += rel * peak
        if passes:
            fallback.check_result(out, ref, torch.bfloat16)
        else:
            with pytest.raises(fallback.BackendCheckError, match="tolerance 0.0195"):
                fallback.check_result(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 45, 29, 23), (37, 45, 29, 23), (70, 50, 40, 33)])
def test_real_16_bit_kernels_pass_the_bound(gpu_like_chain, dtype, shape):
    """No false alarm on the kernels themselves: every primitive of a forward and backward in bf16 and
    fp16 is checked against the torch backend and keeps the triton backend enabled."""
    n, d_in, d_out, r = shape
    U, s, Vh, b = factors(d_in, d_out, r)
    U, Vh, b = U.to(dtype), Vh.to(dtype), b.to(dtype)
    x = torch.randn(n, d_in).to(dtype).requires_grad_()
    s.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for route in ("factorized", "recomposed"):
            from imse_kernels.ops import force_route
            with force_route(route):
                ik.spectral_linear(x, U, s, Vh, b).float().square().sum().backward()
    assert fallback.disabled_backends() == {}


def test_a_failing_reference_is_not_blamed_on_the_backend(gpu_like_chain, monkeypatch):
    def oom(self, *args):
        raise torch.OutOfMemoryError("simulated: no memory left for the reference")

    monkeypatch.setattr(TorchBackend, "factorized_forward", oom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "disabled" warning
        with pytest.raises(torch.OutOfMemoryError, match="simulated") as info:
            _call(grad=False)
    assert "is not blamed" in "".join(getattr(info.value, "__notes__", ["is not blamed"]))
    assert fallback.disabled_backends() == {}
    monkeypatch.undo()
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    with torch.no_grad():
        x, U, s, Vh, b, y = _call(grad=False)  # the reference works again: checked now, and served
    _expect_oracle(x, U, s, Vh, b, y)
    assert backends.serving_backend(torch.device("cpu")) == "triton"


class _PoisonedDevice:
    """A simulated sticky CUDA fault: once `fault` ran, every later call on the device raises."""

    ERROR = "CUDA error: an illegal memory access was encountered"

    def __init__(self, monkeypatch):
        self.poisoned = False
        for cls in (TorchBackend, type(backends._instances["cpu"]) if "cpu" in backends._instances else None):
            if cls is None:
                continue
            for name in fallback.PRIMITIVES:
                if name in vars(cls) or cls is TorchBackend:
                    monkeypatch.setattr(cls, name, self._guard(getattr(cls, name)))

    def _guard(self, fn):
        def call(*args, **kwargs):
            if self.poisoned:
                raise RuntimeError(self.ERROR)
            return fn(*args, **kwargs)
        return call

    def fault(self, *args, **kwargs):
        self.poisoned = True
        raise RuntimeError(self.ERROR)


def test_a_poisoned_context_is_reported_recorded_and_skipped_by_the_next_process(gpu_like_chain, monkeypatch,
                                                                                faults_file):
    ik.available_backends()  # instantiate the cpu backend before patching it
    device = _PoisonedDevice(monkeypatch)
    monkeypatch.setattr(type(gpu_like_chain), "factorized_forward", device.fault)
    with pytest.raises(fallback.CudaContextLost, match="triton backend's factorized_forward") as info:
        _call(grad=False)
    message = str(info.value)
    assert "Restart the process" in message and str(faults_file) in message
    disabled = fallback.disabled_backends()
    assert list(disabled) == ["triton"] and "poisoned" in disabled["triton"]  # cpu and torch are not blamed
    recorded = json.loads(faults_file.read_text())
    assert list(recorded) == [fallback.machine_key(torch.device("cpu"))]
    assert "illegal memory access" in recorded[fallback.machine_key(torch.device("cpu"))]["triton"]

    # The next process on this machine: the device works again, and auto starts without triton.
    fallback.reset()
    device.poisoned = False
    with torch.no_grad():
        x, U, s, Vh, b, y = _call(grad=False)
    _expect_oracle(x, U, s, Vh, b, y)
    assert backends.serving_backend(torch.device("cpu")) == "cpu"
    assert "earlier process" in fallback.disabled_backends()["triton"]

    fallback.forget_faults()  # a fixed driver or kernel: triton is tried again
    assert not faults_file.exists()
    assert backends.serving_backend(torch.device("cpu")) == "triton"


def test_a_fault_that_leaves_the_device_usable_still_falls_back(gpu_like_chain, monkeypatch, faults_file):
    def fault(self, *args):
        raise RuntimeError("CUDA error: too many resources requested for launch")

    monkeypatch.setattr(type(gpu_like_chain), "factorized_forward", fault)
    with pytest.warns(RuntimeWarning, match="disabled"):
        _expect_oracle(*_call(grad=False))
    assert not faults_file.exists()
