"""GPU tests of the C++/CUDA backend (csrc/cuda); skipped without a CUDA device.

Every primitive against the torch backend (float64 oracle and the same dtype), in fp32 (exact and
TF32), fp64, bf16 and fp16, at odd shapes, N = 1, truncated rank, no bias and ViT-B/16 shapes
(batch 1 and 64); the custom kernels (fused chain, deterministic ds) against the cuBLAS/ATen path
and the oracle, and the switch between them (`cuda_fused_kernels`, IMSE_CUDA_FUSED); ds bitwise
deterministic across runs; the public op end to end (autograd, both routes, frozen s, 3-D input);
streams and input checks. Per-sample codes (docs/design.md §8): the three indexed ops (gather-scale
and segmented dS kernels, or their ATen path) against a float64 per-code loop with the switch on and
off, bitwise deterministic dS, and which kernels each setting launches. The emulated CPU runs of the
same kernels are in tests/gpu/test_cuda_build.py.
"""
import cuda_memcheck_case as case
import pytest
import torch

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# ViT-B/16 layers: (d_in, d_out), full rank r = min(d_in, d_out).
VIT_LAYERS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}


@pytest.fixture(scope="module")
def ops():
    import imse_kernels  # noqa: F401  (loads _C and, through the backend, _C_cuda)
    from imse_kernels.backends import unavailable_reason

    reason = unavailable_reason("cuda")
    assert reason is None, f"a CUDA device is present but the cuda backend is unavailable: {reason}"
    assert torch.cuda.get_device_capability()[0] >= 8, "these kernels need sm_80 or newer"
    return torch.ops.imse_ext


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_small_shapes_every_variant(ops, dtype):
    case.sweep(ops, CUDA, case.SMALL_SHAPES, [dtype], own_oracle=True)


@pytest.mark.parametrize("layer", list(VIT_LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vit_b_batch1(ops, layer, dtype):
    d_in, d_out = VIT_LAYERS[layer]
    for use_tf32 in ((False, True) if dtype == torch.float32 else (False,)):
        with case.tf32(use_tf32):
            case.check_primitives(ops, 197, d_in, d_out, min(d_in, d_out), dtype, CUDA, own_oracle=True)


@pytest.mark.parametrize("layer", ["fc1", "proj", "fc2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vit_b_batch64(ops, layer, dtype):
    # N = 64 · 197 tokens: enough row blocks to fill the GPU; the fused forward forced on (auto leaves
    # it off until measured faster) and off.
    d_in, d_out = VIT_LAYERS[layer]
    for fused in ("1", "0"):
        with case.env(IMSE_CUDA_FUSED=fused):
            case.check_primitives(ops, 64 * 197, d_in, d_out, min(d_in, d_out), dtype, CUDA, own_oracle=True)


def test_vit_b_truncated_rank_no_bias(ops):
    case.check_primitives(ops, 197, 768, 3072, 100, torch.bfloat16, CUDA, bias=False, own_oracle=True)
    case.check_primitives(ops, 1, 3072, 768, 300, torch.float32, CUDA, bias=False, own_oracle=True)


def _all_outputs(ops, x, U, s, Vh, b, grad):
    y, h = ops.factorized_forward(x, U, s, Vh, b, True)
    W = ops.recompose(U, s, Vh)
    return {"y": ops.factorized_forward(x, U, s, Vh, b, False)[0], "y_h": y, "h": h,
            "dx_input": ops.factorized_input_grad(grad, U, s, Vh),
            "ds": ops.factorized_backward(grad, h, U, s, Vh, True)[1],
            "ds_recomposed": ops.recomposed_backward(grad, x, U, s, Vh, W, True)[1]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 4 * 197, 64 * 197])
def test_custom_kernels_match_aten_path_and_oracle(ops, dtype, n):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    x, U, s, Vh, b, grad = case.make_inputs(n, 768, 3072, 700, dtype, CUDA)  # truncated rank
    with cuda_fused_kernels(True):
        fused = _all_outputs(ops, x, U, s, Vh, b, grad)
    with cuda_fused_kernels(False):
        aten = _all_outputs(ops, x, U, s, Vh, b, grad)
    h64 = x.double() @ Vh.double().t()
    t64 = grad.double() @ U.double()
    ref = {"y": (h64 * s.double()) @ U.double().t() + b.double(), "h": h64,
           "dx_input": (t64 * s.double()) @ Vh.double(), "ds": (t64 * h64).sum(0)}
    ref.update(y_h=ref["y"], ds_recomposed=ref["ds"])
    tol = case.TOL[dtype]
    for path, out in (("fused", fused), ("aten", aten)):
        bad = {k: e for k, e in ((k, case.rel_err(out[k], ref[k])) for k in ref) if not e <= tol}
        assert not bad, f"{path} path, {dtype}, N={n}: errors over {tol:g}: {bad}"
    bad = {k: e for k, e in ((k, case.rel_err(fused[k], aten[k])) for k in ref) if not e <= 2 * tol}
    assert not bad, f"fused vs aten path, {dtype}, N={n}: {bad}"


def _own_kernels(fn) -> set:
    """Names of this package's CUDA kernels (namespace imse_cuda) that fn() launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "imse_cuda" in e.name]
    return {k for k in ("fused_kernel", "colsum_kernel", "reduce_kernel") if any(k in n for n in names)}


def test_switch_selects_aten_path(ops):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    x, U, s, Vh, b, grad = case.make_inputs(4 * 197, 768, 768, 768, torch.bfloat16, CUDA)

    def run():
        _all_outputs(ops, x, U, s, Vh, b, grad)

    with cuda_fused_kernels(True):
        assert _own_kernels(run) == {"fused_kernel", "colsum_kernel", "reduce_kernel"}
    with cuda_fused_kernels(True, kernels="ds"), case.env(IMSE_CUDA_FUSED="0"):
        assert _own_kernels(run) == {"colsum_kernel", "reduce_kernel"}
    for off in (cuda_fused_kernels(False), case.env(IMSE_CUDA_FUSED="0")):
        with off:
            assert _own_kernels(run) == set()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_ds_deterministic(ops, dtype, fused):
    with case.env(IMSE_CUDA_FUSED=fused):
        case.check_determinism(ops, 64 * 197, 768, 3072, 768, dtype, CUDA, repeats=3)
        case.check_determinism(ops, 197, 3072, 768, 768, dtype, CUDA, repeats=3)


def test_tf32_follows_torch_flag(ops):
    x, U, s, Vh, b, _ = case.make_inputs(256, 512, 384, 256, torch.float32, CUDA)
    ref = (x.double() @ Vh.double().t() * s.double()) @ U.double().t() + b.double()
    with case.tf32(False):
        exact, _ = ops.factorized_forward(x, U, s, Vh, b, True)
    with case.tf32(True):
        fast, _ = ops.factorized_forward(x, U, s, Vh, b, True)
    assert case.rel_err(exact, ref) < 1e-5
    assert case.rel_err(fast, ref) < case.TF32_TOL


def test_current_stream_is_used(ops):
    x, U, s, Vh, b, grad = case.make_inputs(300, 200, 180, 150, torch.bfloat16, CUDA)
    y0, h0 = ops.factorized_forward(x, U, s, Vh, b, True)
    dx0, ds0 = ops.factorized_backward(grad, h0, U, s, Vh, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y1, h1 = ops.factorized_forward(x, U, s, Vh, b, True)
        dx1, ds1 = ops.factorized_backward(grad, h1, U, s, Vh, True)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and torch.equal(ds0, ds1)


def test_input_checks_on_cuda(ops):
    x, U, s, Vh, b, grad = case.make_inputs(6, 8, 5, 4, torch.float32, CUDA)
    with pytest.raises(RuntimeError, match="U must be a CUDA tensor"):
        ops.factorized_forward(x, U.cpu(), s, Vh, b, True)
    with pytest.raises(RuntimeError, match="s must be a CUDA tensor"):
        ops.recompose(U, s.cpu(), Vh)
    with pytest.raises(RuntimeError, match="Vh has dtype Half but x/grad has Float"):
        ops.factorized_forward(x, U, s, Vh.half(), b, True)
    with pytest.raises(RuntimeError, match=r"grad has shape \[6, 4\]"):
        ops.factorized_backward(grad[:, :4], x[:, :4], U, s, Vh, True)


# ------------------------------------------------------------------------------------------------
# Per-sample codes (docs/design.md §8): indexed_forward / indexed_backward / indexed_input_grad

INDEXED_KERNELS = ("gather_scale_kernel", "segment_partial_kernel", "segment_reduce_kernel")


def _launched(fn, names) -> set:
    """Which of this package's CUDA kernels `names` fn() launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launched = [e.name for e in prof.events() if "imse_cuda" in e.name]
    return {k for k in names if any(k in n for n in launched)}


def _per_sample_index(batch, tokens, k, seed=0):
    """One code per sample (codes 0..k-1 drawn at random; some may be unused), repeated over tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (batch,), generator=g).repeat_interleave(tokens).to(CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [True, False])
def test_indexed_small_shapes_match_float64_loop(ops, dtype, fused):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    with cuda_fused_kernels(fused):
        for i, shape in enumerate(case.INDEXED_SHAPES):
            case.check_indexed(ops, *shape, dtype, CUDA, bias=(i % 2 == 0), seed=i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 197, 768, 768, 768, 3), (64, 197, 768, 3072, 700, 64),
                                   (1, 1, 3072, 768, 300, 1)])
def test_indexed_vit_shapes_kernels_and_aten_path(ops, dtype, shape):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    b_, t_, d_in, d_out, r, k = shape
    x, U, S, Vh, b, grad, _ = case.make_indexed_inputs(b_ * t_, d_in, d_out, r, k, dtype, CUDA)
    index = _per_sample_index(b_, t_, k)
    ref = case.indexed_reference(x, U, S, Vh, b, grad, index)
    outs = {}
    for fused in (True, False):
        with cuda_fused_kernels(fused):
            outs[fused] = case.run_indexed(ops, x, U, S, Vh, b, grad, index)
    tol = case.tol_for(dtype)
    for fused, out in outs.items():
        bad = {key: e for key, e in ((key, case.rel_err(out[key], ref[key])) for key in ref) if not e <= tol}
        assert not bad, f"fused={fused}, {dtype}, {shape}: errors over {tol:g}: {bad}"
    bad = {key: e for key, e in ((key, case.rel_err(outs[True][key], outs[False][key])) for key in ref)
           if not e <= 2 * tol}
    assert not bad, f"kernels vs ATen path, {dtype}, {shape}: {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [True, False])
def test_indexed_deterministic(ops, dtype, fused):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    for b_, t_, k in ((64, 197, 64), (16, 197, 1), (3, 1000, 5)):
        x, U, S, Vh, b, grad, _ = case.make_indexed_inputs(b_ * t_, 768, 768, 768, k, dtype, CUDA, seed=2)
        index = _per_sample_index(b_, t_, k, seed=2)
        with cuda_fused_kernels(fused):
            first = case.run_indexed(ops, x, U, S, Vh, b, grad, index)
            for _ in range(2):
                again = case.run_indexed(ops, x, U, S, Vh, b, grad, index)
                for key, v in first.items():
                    assert torch.equal(v, again[key]), f"{key} differs between runs ({dtype}, fused={fused}, K={k})"


def test_indexed_switch_selects_aten_path(ops):
    from imse_kernels.backends.compiled_backend import cuda_fused_kernels

    x, U, S, Vh, b, grad, _ = case.make_indexed_inputs(4 * 197, 768, 768, 768, 4, torch.bfloat16, CUDA)
    index = _per_sample_index(4, 197, 4)

    def run():
        case.run_indexed(ops, x, U, S, Vh, b, grad, index)

    with case.env(IMSE_CUDA_FUSED=None):  # auto: both always run
        assert _launched(run, INDEXED_KERNELS) == set(INDEXED_KERNELS)
    with cuda_fused_kernels(True):
        assert _launched(run, INDEXED_KERNELS) == set(INDEXED_KERNELS)
    with cuda_fused_kernels(True, kernels="ds"), case.env(IMSE_CUDA_FUSED="0"):
        assert _launched(run, INDEXED_KERNELS) == {"segment_partial_kernel", "segment_reduce_kernel"}
    with cuda_fused_kernels(True, kernels="chain"), case.env(IMSE_CUDA_FUSED="0"):
        assert _launched(run, INDEXED_KERNELS) == {"gather_scale_kernel"}
    for off in (cuda_fused_kernels(False), case.env(IMSE_CUDA_FUSED="0")):
        with off:
            assert _launched(run, INDEXED_KERNELS + ("fused_kernel", "colsum_kernel", "reduce_kernel")) == set()


def test_indexed_input_checks_on_cuda(ops):
    x, U, S, Vh, b, grad, index = case.make_indexed_inputs(6, 8, 5, 4, 3, torch.float32, CUDA)
    with pytest.raises(RuntimeError, match="index must be a CUDA tensor"):
        ops.indexed_forward(x, U, S, Vh, b, index.cpu(), True)
    with pytest.raises(RuntimeError, match="S must be a CUDA tensor"):
        ops.indexed_input_grad(grad, U, S.cpu(), Vh, index)


def test_memcheck_case_script_runs(ops):
    assert case.main(["--quick"]) == 0


# ------------------------------------------------------------------------------------------------
# The public op on the cuda backend

def _reference_grads(x, U, s, Vh, bias, g):
    x64 = x.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    y = (x64 @ Vh.double().t() * s64) @ U.double().t()
    if bias is not None:
        y = y + bias.double()
    y.backward(g.double())
    return y.detach(), x64.grad, s64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# route F (rectangular), route R (square, N > 2·d), batch 1 with truncated rank
@pytest.mark.parametrize("shape", [(2, 197, 768, 3072, 768), (16, 197, 768, 768, 768), (1, 1, 64, 48, 20)])
def test_spectral_linear_end_to_end(ops, dtype, shape):
    from imse_kernels import spectral_linear, use_backend

    b_, t_, d_in, d_out, r = shape
    x, U, s, Vh, bias, _ = case.make_inputs(b_ * t_, d_in, d_out, r, dtype, CUDA)
    x = x.reshape(b_, t_, d_in).requires_grad_()
    s = s.clone().requires_grad_()
    g = torch.randn(b_, t_, d_out, device=CUDA, dtype=dtype)
    with use_backend("cuda"):
        y = spectral_linear(x, U, s, Vh, bias)
        y.backward(g)
    y64, dx64, ds64 = _reference_grads(x, U, s, Vh, bias, g)
    tol = case.tol_for(dtype)
    assert case.rel_err(y, y64) < tol
    assert case.rel_err(x.grad, dx64) < tol
    assert case.rel_err(s.grad, ds64) < tol
    assert s.grad.dtype == torch.float32


def test_spectral_linear_frozen_s_and_no_grad(ops):
    from imse_kernels import spectral_linear, use_backend

    x, U, s, Vh, bias, _ = case.make_inputs(197, 768, 3072, 768, torch.bfloat16, CUDA)
    x.requires_grad_()
    g = torch.randn(197, 3072, device=CUDA, dtype=torch.bfloat16)
    with use_backend("cuda"):
        y = spectral_linear(x, U, s, Vh, bias)  # s frozen: dx only
        y.backward(g)
        with torch.no_grad():
            y_ng = spectral_linear(x, U, s, Vh, None)
    y64, dx64, _ = _reference_grads(x, U, s, Vh, bias, g)
    assert case.rel_err(y, y64) < case.TOL[torch.bfloat16]
    assert case.rel_err(x.grad, dx64) < case.TOL[torch.bfloat16]
    assert case.rel_err(y_ng, y64 - bias.double()) < case.TOL[torch.bfloat16]


def test_spectral_linear_gradcheck_float64(ops):
    from imse_kernels import spectral_linear, use_backend

    g = torch.Generator(device="cuda").manual_seed(0)
    for (n, d_in, d_out, r) in [(5, 7, 12, 3), (16, 4, 4, 4)]:
        x = torch.randn(n, d_in, dtype=torch.float64, device=CUDA, generator=g, requires_grad=True)
        U = torch.randn(d_out, r, dtype=torch.float64, device=CUDA, generator=g)
        Vh = torch.randn(r, d_in, dtype=torch.float64, device=CUDA, generator=g)
        s = torch.rand(r, dtype=torch.float64, device=CUDA, generator=g).requires_grad_()
        bias = torch.randn(d_out, dtype=torch.float64, device=CUDA, generator=g)
        with use_backend("cuda"):
            assert torch.autograd.gradcheck(lambda x_, s_, U=U, Vh=Vh, bias=bias: spectral_linear(x_, U, s_, Vh, bias),
                                            (x, s))


def test_cuda_backend_available_on_gpu(ops):
    from imse_kernels.backends import available_backends, get_backend

    assert "cuda" in available_backends()
    backend = get_backend("cuda")
    assert backend.supports(CUDA) and not backend.supports(torch.device("cpu"))
