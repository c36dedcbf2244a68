"""pytest-benchmark suite for the core op (not part of the default `tests/` collection).

    pytest benchmarks/test_bench_ops.py                       # CPU, every available backend
    pytest benchmarks/test_bench_ops.py --benchmark-group-by=group --benchmark-sort=mean
    pytest benchmarks/test_bench_ops.py --benchmark-save=cpu  # keep a run to compare with --benchmark-compare

Each group is one layer shape, batch and mode; inside it nn.Linear, the reference formulation and
FusedSpectralLinear through every available backend run the same work. On CUDA machines the same
cases run on the GPU in fp32 and bf16 (pytest-benchmark times with a host clock: each call ends with a
device synchronize). throughput.py is the side-by-side measurement with ratios; this suite is for
tracking single numbers over time.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import layer_bench as LB  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("pytest_benchmark")

CASES = [("vit_s", "proj", 1), ("vit_s", "qkv", 8), ("vit_b", "fc1", 1), ("vit_b", "fc2", 8)]
MODES = ["fwdbwd", "frozen", "infer"]
DEVICES = [("cpu", "fp32")]
if torch.cuda.is_available():
    DEVICES += [("cuda", "fp32"), ("cuda", "bf16")]
_FUSED = list(dict.fromkeys(p for d in dict.fromkeys(d for d, _ in DEVICES) for p in LB.fused_providers(d)))
PROVIDERS = ["linear", "linear_frozen", "reference"] + _FUSED


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device,dtype", DEVICES, ids=[f"{d}-{t}" for d, t in DEVICES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("net,layer,batch", CASES, ids=[f"{n}.{lay}-b{b}" for n, lay, b in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_spectral_layer(benchmark, provider, net, layer, batch, mode, device, dtype):
    if provider not in LB.providers_for_mode(mode, [provider]):
        pytest.skip(f"{provider} is not a provider of mode {mode}")
    if provider.startswith("fused_") and provider != "fused_auto":
        backend = provider[len("fused_"):]
        from imse_kernels.backends import get_backend

        if not get_backend(backend).supports(torch.device(device)):
            pytest.skip(f"backend {backend} does not run on {device}")
    case = LB.Case(net, layer, batch, mode, dtype)
    fns, _ = LB.build_case(case, device, [provider])
    fn = fns[provider]

    def call():
        fn()
        _sync(device)

    benchmark.group = f"{device}-{dtype} {case.name} b{batch} {mode}"
    benchmark.extra_info.update(d_in=case.d_in, d_out=case.d_out, tokens=case.tokens)
    benchmark.pedantic(call, warmup_rounds=2, rounds=7, iterations=3 if batch == 1 else 1)
