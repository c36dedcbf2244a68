"""The Triton backend compiled for a real GPU, at ViT-B/16 layer shapes (skipped without CUDA, and
when TRITON_INTERPRET=1 would interpret instead of compile).

Each variant (fused / split) is forced in turn with the default tile configuration (tuning off, so
the run stays short), in float32, bfloat16 and float16, against a float64 oracle on the GPU; the
tolerance is twice PyTorch's own error in the same dtype plus a small floor (`assert_close` in tests/helpers.py).
Run by checks/gpu_check.sh.
"""
import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, oracle_backward, oracle_forward  # noqa: E402

from imse_kernels import spectral_linear, use_backend  # noqa: E402
from imse_kernels.backends import get_backend  # noqa: E402
from imse_kernels.triton_kernels import runtime, tuning  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(runtime.INTERPRETED, reason="TRITON_INTERPRET=1: GPU tests need compiled kernels"),
]

VIT_B = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCHES = {"batch1": 197, "batch64": 64 * 197}


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    monkeypatch.setenv("IMSE_TRITON_TUNE", "0")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is compared at full fp32 precision
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _layer(d_in, d_out, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    b = torch.randn(d_out, device="cuda", generator=g) * 0.1
    return U.to(dtype).contiguous(), s.float(), Vh.to(dtype).contiguous(), b.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", list(VIT_B))
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("variant", ["fused", "split"])
def test_factorized_primitives_vit_b(variant, batch, layer, dtype):
    tb, ref = get_backend("triton"), get_backend("torch")
    d_in, d_out = VIT_B[layer]
    n = BATCHES[batch]
    U, s, Vh, b = _layer(d_in, d_out, dtype)
    x = torch.randn(n, d_in, device="cuda").to(dtype)
    g = (torch.randn(n, d_out, device="cuda") * 0.1).to(dtype)
    with tuning.force(variant):
        y, h = tb.factorized_forward(x, U, s, Vh, b, True)
        dx, ds = tb.factorized_backward(g, h, U, s, Vh, True)
        dx_only = tb.factorized_input_grad(g, U, s, Vh)
    y_ref, h_ref = ref.factorized_forward(x, U, s, Vh, b, True)
    dx_ref, ds_ref = ref.factorized_backward(g, h_ref, U, s, Vh, True)
    y64, h64 = oracle_forward(x, U, s, Vh, b)
    dx64, ds64 = oracle_backward(g, h, U, s, Vh)
    assert_close(y, y64, y_ref, "y")
    assert_close(h, h64, h_ref, "h")
    assert_close(dx, dx64, dx_ref, "dx")
    assert_close(dx_only, dx64, dx_ref, "dx (input grad)")
    assert_close(ds, ds64, ref.factorized_backward(g, h, U, s, Vh, False)[1], "ds", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", list(VIT_B))
def test_recomposed_primitives_vit_b(layer, dtype):
    tb, ref = get_backend("triton"), get_backend("torch")
    d_in, d_out = VIT_B[layer]
    n = BATCHES["batch64"]
    U, s, Vh, _ = _layer(d_in, d_out, dtype)
    W = tb.recompose(U, s, Vh)
    assert_close(W, (U.double() * s.double()) @ Vh.double(), ref.recompose(U, s, Vh), "W")
    x = torch.randn(n, d_in, device="cuda").to(dtype)
    g = (torch.randn(n, d_out, device="cuda") * 0.1).to(dtype)
    _, ds = tb.recomposed_backward(g, x, U, s, Vh, W, False)
    G64 = g.double().t() @ x.double()
    ds64 = ((U.double().t() @ G64) * Vh.double()).sum(1)
    assert_close(ds, ds64, ref.recomposed_backward(g, x, U, s, Vh, W, False)[1], "ds", dtype)


def test_ds_is_deterministic():
    tb = get_backend("triton")
    U, s, Vh, _ = _layer(768, 3072, torch.bfloat16)
    x = torch.randn(4096, 768, device="cuda").bfloat16()
    g = torch.randn(4096, 3072, device="cuda").bfloat16()
    h = x @ Vh.t()
    for variant in ("fused", "split"):
        with tuning.force(variant):
            a = tb.factorized_backward(g, h, U, s, Vh, True)[1]
            b_ = tb.factorized_backward(g, h, U, s, Vh, True)[1]
        assert torch.equal(a, b_), variant


def test_tuned_choice_is_correct_and_cached(monkeypatch):
    monkeypatch.setenv("IMSE_TRITON_TUNE", "1")
    tb, ref = get_backend("triton"), get_backend("torch")
    U, s, Vh, b = _layer(768, 3072, torch.bfloat16)
    x = torch.randn(3000, 768, device="cuda").bfloat16()
    y, _ = tb.factorized_forward(x, U, s, Vh, b, False)
    keys = [k for k in tuning.choices() if k.startswith("fwd|") and "768x3072x768" in k]
    assert keys, tuning.choices()
    assert_close(y, oracle_forward(x, U, s, Vh, b)[0], ref.factorized_forward(x, U, s, Vh, b, False)[0], "y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_spectral_linear_training_step_vit_b(dtype):
    """The public op, both routes, 3-D input, against the torch backend's gradients."""
    U, s, Vh, b = _layer(768, 2304, dtype)
    x0 = torch.randn(8, 197, 768, device="cuda").to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        sp = s.clone().requires_grad_()
        with use_backend(backend):
            y = spectral_linear(x, U, sp, Vh, b)
            y.float().square().mean().backward()
        results[backend] = (y.detach(), x.grad, sp.grad)
    for got, want, what in zip(results["triton"], results["torch"], ("y", "dx", "ds")):
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err < (3e-2 if dtype == torch.bfloat16 else 1e-4), (what, err)


def test_torch_compile_fullgraph_on_gpu():
    U, s, Vh, b = _layer(768, 768, torch.bfloat16)
    x = torch.randn(4, 197, 768, device="cuda").bfloat16().requires_grad_()
    sp = s.clone().requires_grad_()
    torch._dynamo.reset()
    f = torch.compile(lambda x, s: spectral_linear(x, U, s, Vh, b), fullgraph=True)
    with use_backend("triton"):
        f(x, sp).float().sum().backward()
    assert torch.isfinite(sp.grad).all() and x.grad.shape == x.shape
