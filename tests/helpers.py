"""What the test modules share: float64 oracles, random factors, the tiny ViT, synthetic domains, and a few
small tools. Test modules import from here (or from the other non-test modules of tests/), never from
each other (tests/project/test_tests_layout.py checks it). Fixtures live in tests/conftest.py.
"""
import torch


def cpu_backends() -> list:
    """The CPU backends this build has: `torch` always, `cpu` when the compiled extension loads. (imse_kernels
    is imported here, not above: cuda_memcheck_case.py uses this module in processes that must not load it.)"""
    import imse_kernels

    return [b for b in ("torch", "cpu") if b in imse_kernels.available_backends()]


# ------------------------------------------------------------------ float64 oracles and random inputs

def oracle_forward(x, U, s, Vh, bias):
    """float64 y = ((x·Vhᵀ) ⊙ s)·Uᵀ + bias, and h = x·Vhᵀ."""
    h = x.double() @ Vh.double().t()
    y = (h * s.double()) @ U.double().t()
    if bias is not None:
        y = y + bias.double()
    return y, h


def oracle(x, U, s, Vh, bias=None):
    """float64 ((x·Vhᵀ) ⊙ s)·Uᵀ + bias."""
    return oracle_forward(x, U, s, Vh, bias)[0]


def oracle_backward(grad, h, U, s, Vh):
    """float64 dx, ds of the factorized route."""
    t = grad.double() @ U.double()
    return (t * s.double()) @ Vh.double(), (h.double() * t).sum(0)


def per_code_oracle(x, U, S, Vh, bias, grad, index):
    """float64 y, h, dx, dS of per-sample codes (row n uses the code S[index[n]]), one code at a time;
    the dS rows of codes no row uses are 0."""
    x64, U64, S64, Vh64, g64 = (t.detach().double() for t in (x, U, S, Vh, grad))
    h, t = x64 @ Vh64.t(), g64 @ U64
    y = torch.zeros(x.shape[0], U.shape[0], dtype=torch.float64, device=x.device)
    dx = torch.zeros(x.shape[0], Vh.shape[1], dtype=torch.float64, device=x.device)
    dS = torch.zeros(S.shape, dtype=torch.float64, device=x.device)
    for c in range(S.shape[0]):
        rows = (index == c).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        y[rows] = (h[rows] * S64[c]) @ U64.t() + (bias.double() if bias is not None else 0.0)
        dx[rows] = (t[rows] * S64[c]) @ Vh64
        dS[c] = (h[rows] * t[rows]).sum(0)
    return y, h, dx, dS


def factors(d_in, d_out, r, dtype=torch.float32, s_dtype=torch.float32, bias=True):
    """Orthonormal U, Vh and positive s like an SVD produces, plus an optional bias (torch's global RNG)."""
    U = torch.linalg.qr(torch.randn(d_out, r, dtype=torch.float64))[0].to(dtype)
    Vh = torch.linalg.qr(torch.randn(d_in, r, dtype=torch.float64))[0].t().contiguous().to(dtype)
    s = (torch.rand(r, dtype=torch.float64) + 0.5).to(s_dtype)
    b = torch.randn(d_out, dtype=dtype) if bias else None
    return U, s, Vh, b


def spectral_inputs(n, d_in, d_out, r, dtype, bias=True, seed=0):
    """x (n, d_in), U (d_out, r), s (r,) float32, Vh (r, d_in), bias (d_out,) or None, from their own
    generator; orthonormal-ish factors like a real SVD so the output has unit-scale entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    U = torch.linalg.qr(torch.randn(d_out, r, generator=g))[0] if d_out >= r else \
        torch.randn(d_out, r, generator=g) / r ** 0.5
    Vh = torch.linalg.qr(torch.randn(d_in, r, generator=g))[0].t() if d_in >= r else \
        torch.randn(r, d_in, generator=g) / d_in ** 0.5
    s = torch.rand(r, generator=g) * 2 + 0.25
    b = torch.randn(d_out, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return cast(x), cast(U), s, cast(Vh), cast(b)


def code_table(k, r, dtype=torch.float32):
    """A (K, r) table of positive codes (torch's global RNG)."""
    return (torch.rand(k, r, dtype=torch.float64) + 0.5).to(dtype)


# ------------------------------------------------------------------ the tolerance rule of the kernel tests

#: The floor of the rule below per dtype (float32: 1e-5, docs/design.md §4).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close(got: torch.Tensor, ref64: torch.Tensor, torch_result: torch.Tensor = None, what: str = "",
                 dtype: torch.dtype = None) -> None:
    """A kernel result in dtype D passes when its error against the float64 oracle (computed from the same
    D-rounded inputs) is at most twice PyTorch's own error in D (`torch_result`, from the same inputs, if
    any) plus FLOOR[D], relative to the oracle's largest magnitude; in float32 the floor alone also bounds
    it. `dtype`: the inputs' dtype D (default got's: ds is float32 whatever D is)."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    dtype = dtype or got.dtype
    floor = FLOOR.get(dtype, 1e-5)
    tol = floor if torch_result is None else 2 * rel_err(torch_result, ref64) + floor
    if dtype == torch.float32:
        tol = min(tol, 1e-5)
    err = rel_err(got, ref64)
    assert err <= tol, f"{what}: relative error {err:.3g} > tolerance {tol:.3g} ({got.dtype})"


# ------------------------------------------------------------------ the tiny ViT and its synthetic domains

def tiny_vit(depth=4, dtype=torch.float32, seed=None, head_scale=30.0, spectral=False, **arch):
    """A random timm ViT at 32 px (patch 8, width 48, 3 heads, 10 classes; `arch` overrides these), in
    train mode. `seed`: torch.manual_seed first (None: the caller's RNG state). `head_scale`: the head's
    weight is multiplied by it, so that some samples pass the adapters' entropy filters (None: as
    initialised). `spectral`: its blocks' linear layers spectralized."""
    from timm.models.vision_transformer import VisionTransformer

    from imse_kernels import spectralize

    if seed is not None:
        torch.manual_seed(seed)
    arch = dict(dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, num_classes=10), **arch)
    m = VisionTransformer(depth=depth, **arch)
    if head_scale is not None:
        with torch.no_grad():
            m.head.weight.mul_(head_scale)
    if spectral:
        spectralize(m)
    return m.to(dtype)


def domain(x, d):
    """The images x moved into synthetic domain d: 0 as they are, 1-3 rescaled and shifted."""
    return [x, x * 1.8 + 0.6, x * 0.5 - 0.5, x * 1.2 - 1.0][d]


def image_source(seed=1):
    """images(d): a new batch of 8 random 32-px images in domain d at each call, from one generator."""
    g = torch.Generator().manual_seed(seed)

    def images(d):
        return domain(torch.randn(8, 3, 32, 32, generator=g), d)

    return images


def imse_adapter(seed=0):
    """IMSE on the tiny ViT; the same seed gives the same pretrained weights (source code)."""
    from imse_kernels.tta import IMSE, IMSEConfig

    torch.manual_seed(seed)
    return IMSE(tiny_vit(), IMSEConfig(stats_window=8, lr=3e-3))


def adapted_imse(domains=(1, 1, 2, 2, 3), seed=0):
    """An IMSE adapter with source statistics after a stream over `domains`: (1, 1, 2, 2, 3) shifts twice,
    so its bank holds 3 entries (source + 2, with descriptors, codes and Adam states)."""
    adapter = imse_adapter(seed)
    images = image_source()
    adapter.source_statistics([images(0)])
    for d in domains:
        adapter(images(d))
    return adapter


# ------------------------------------------------------------------ synthetic token streams (the code bank)

#: Channels and tokens per image of the synthetic tokens.
TOKEN_CHANNELS, TOKENS_PER_IMAGE = 12, 16


def token_domains(n=3, seed=5):
    """n synthetic domains of tokens, each a per-channel (mean, std)."""
    g = torch.Generator().manual_seed(seed)
    c = TOKEN_CHANNELS
    return [(torch.randn(c, generator=g) * 1.5, torch.rand(c, generator=g) * 2 + 0.3) for _ in range(n)]


def domain_tokens(domain, batch, seed):
    """float32 tokens (batch, TOKENS_PER_IMAGE, TOKEN_CHANNELS) of a domain from token_domains(), as a model's
    (the trackers' moments of them are float32 sums)."""
    mean, std = domain
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS_PER_IMAGE, TOKEN_CHANNELS, generator=g) * std + mean


# ------------------------------------------------------------------ small tools

class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed and delegates to another backend."""

    def __init__(self, inner="aot_eager"):
        self.inner, self.graphs = torch._dynamo.lookup_backend(inner), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def run_cli(args, capsys):
    """imse-eval's `main(args)` in this process: (exit status, stdout, stderr)."""
    from imse_kernels.eval.__main__ import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err
