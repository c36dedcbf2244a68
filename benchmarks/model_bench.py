#!/usr/bin/env python
"""Model level: one adaptation step of a timm ViT, every method side by side.

    python benchmarks/model_bench.py --models vit_small --model-batches 8
    python benchmarks/model_bench.py --quick                    # smoke run (4-block ViT-Tiny at 64 px)
    python benchmarks/model_bench.py --model-providers imse,imse_compiled,imse_reference,imse_reference_compiled

Providers (each on its own deep copy of one random-init model; nothing is downloaded)
  imse             imse_kernels.tta.IMSE (FusedSpectralLinear, its own SAM/losses), retrieval "none"
                   by default (the reference step has no code bank; --imse-retrieval changes it)
  imse_harness     the step below written out by hand, on FusedSpectralLinear layers (last 3 blocks' s frozen)
  imse_reference   the same hand-written step the reference way: `ReferenceSVDLinear` recomposes
                   U @ torch.diag(s) @ Vh every call, every s gets a gradient (only blocks 0..depth-4 are
                   optimized), and the diversity statistics come from an extra GEMM x̂ @ Vhᵀ per probed layer
  imse_compiled    `imse` with IMSE(..., compile=True): forward + loss through torch.compile (inductor)
  imse_cudagraphs  `imse` with compile={"mode": "reduce-overhead"}: inductor + CUDA graphs (CUDA only)
  imse_reference_compiled   `imse_reference` with its forward + loss through torch.compile (inductor; the
                   reference loss indexes with boolean masks, so dynamo splits the graph there), same update
  tent             imse_kernels.tta.Tent (LayerNorm affine, entropy, Adam) on the nn.Linear model
  source           plain inference (no_grad) on the nn.Linear model
  source_spectral  plain inference on the spectralized model (s frozen: cached W', one GEMM per layer)

The hand-written step (docs/design.md §6): forward → L = mean_{H<E0} H − λ·L_div → backward → SAM ascent
(ρ·g/‖g‖) → forward on the same batch (first pass's reliable set, filtered again) → L → backward →
restore → Adam. Random-init ViTs are nearly uniform on random images, which would make every sample
"unreliable"; the head is therefore rescaled so that about half the samples pass the entropy filter.
Writes benchmarks/results/model_<machine>[_quick].{json,csv,txt} through report.py.
"""
import argparse
import copy
import math
import sys
import time

import bench_common as BC
import report
import torch
import torch.nn.functional as F
from bench_common import (
    Record,
    SavedTensorTracker,
    device_peak_bytes,
    load1,
    measure_interleaved,
    min_ratio,
    paired_ratio,
)
from torch import nn

import imse_kernels
from imse_kernels import FusedSpectralLinear, spectralize

MODEL_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
               "vit_base": "vit_base_patch16_224"}
PROVIDERS = ("imse", "imse_harness", "imse_reference", "tent", "source", "source_spectral")
# Opt-in providers: their compile time is paid in warm-up.
COMPILED_PROVIDERS = ("imse_compiled", "imse_reference_compiled", "imse_cudagraphs")
REFERENCE = "imse_reference"
LAYER_PATTERNS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def tta_available() -> bool:
    try:
        from imse_kernels.tta import IMSE, IMSEConfig, Source, Tent  # noqa: F401
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------
# The reference formulation

class ReferenceSVDLinear(nn.Module):
    """The reference code's SVD layer: W = U @ diag(s) @ Vh recomposed on every call, then F.linear."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        with torch.no_grad():
            U, s, Vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        self.register_buffer("U", U.to(linear.weight.dtype))
        self.register_buffer("Vh", Vh.to(linear.weight.dtype))
        self.s = nn.Parameter(s.float())
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x):
        W = self.U @ torch.diag(self.s.to(self.U.dtype)) @ self.Vh
        return F.linear(x, W, self.bias)


def reference_spectralize(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [n for n, m in model.named_modules()
               if type(m) is nn.Linear and ".blocks." in f".{n}" and n.endswith(LAYER_PATTERNS)]
    for name in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ReferenceSVDLinear(model.get_submodule(name)))


# --------------------------------------------------------------------------------------------
# The hand-written IMSE step (shared by imse_harness and imse_reference)

def _entropy(logits):
    z = logits.float()
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


class HandIMSE:
    """One SAM step of IMSE written out in plain PyTorch, on whatever spectral layer type the model has."""

    def __init__(self, model: nn.Module, layer_type, all_s_grad: bool, lr=7e-3, rho=0.05, margin=0.4,
                 lam=50.0, ratio=1.0, div_blocks=3, compile=False) -> None:
        self.model, self.rho, self.margin, self.lam = model, rho, margin, lam
        self.ratio, self.div_blocks = ratio, div_blocks
        depth = len(model.blocks)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}
        block = {n: int(n.split("blocks.")[1].split(".")[0]) for n in layers}
        self.params = [m.s for n, m in layers.items() if block[n] < depth - 3]
        for n, m in layers.items():
            m.s.requires_grad_(all_s_grad or block[n] < depth - 3)
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.stats = []
        self.capture = False
        for n, m in layers.items():
            if block[n] >= depth - div_blocks:
                m.register_forward_pre_hook(self._hook)
        model.train()
        # compile: forward + loss of each pass through torch.compile (the update stays eager, as in IMSE)
        self._fwd_loss = torch.compile(self._forward_loss) if compile else self._forward_loss

    def _forward_loss(self, x, keep=None):
        logits = self.model(x)
        loss, mask = self._loss(logits, keep)
        return logits, loss, mask

    def _hook(self, module, args):
        if self.capture and torch.is_grad_enabled():
            x = args[0].reshape(-1, args[0].shape[-1])
            a = F.normalize(x, dim=-1) @ module.Vh.t().to(x.dtype)  # the extra GEMM
            std = a.float().std(0)  # unbiased
            k = min(math.floor(std.shape[0] * self.ratio), std.shape[0] - 1)
            self.stats.append(std.topk(k, largest=False).values.mean())

    def _loss(self, logits, keep=None):
        ent = _entropy(logits)
        if keep is not None:
            ent = ent[keep]
        mask = ent.detach() < self.margin * math.log(logits.shape[1])
        sel = ent[mask]
        loss = sel.mean() if sel.numel() else sel.sum()
        if self.stats:
            loss = loss - self.lam * sum(self.stats) / self.div_blocks
        self.stats = []
        return loss, mask

    @torch.enable_grad()
    def __call__(self, x):
        self.model.zero_grad(set_to_none=True)
        self.capture = True
        try:
            logits, loss, mask = self._fwd_loss(x)
            loss.backward()
            with torch.no_grad():
                norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm(2) for p in self.params if p.grad is not None]))
                scale = self.rho / (norm + 1e-12)
                eps = []
                for p in self.params:
                    e = p.grad * scale if p.grad is not None else torch.zeros_like(p)
                    p.add_(e)
                    eps.append(e)
            self.model.zero_grad(set_to_none=True)
            _, loss2, _ = self._fwd_loss(x, mask)
            loss2.backward()
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    p.sub_(e)
            self.opt.step()
            self.model.zero_grad(set_to_none=True)
        finally:
            self.capture = False
        return logits.detach()


# --------------------------------------------------------------------------------------------
# Model and providers

def make_model(name: str, device: str, depth=None, img_size=None, seed: int = 0, calib_batch: int = 8) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    kwargs = {"depth": depth} if depth else {}
    if img_size:
        kwargs["img_size"] = img_size
    model = timm.create_model(MODEL_NAMES.get(name, name), pretrained=False, num_classes=1000, **kwargs)
    model = model.to(device).eval()
    # rescale the head so that about half the samples are "reliable" (entropy < 0.4 ln C)
    x = torch.randn(calib_batch, 3, *image_size(model), device=device)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        e0 = 0.4 * math.log(model.num_classes)
        lo, hi = 1.0, 1e4
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            ent = _entropy(F.linear(feats, model.head.weight * mid, model.head.bias * mid)).median().item()
            lo, hi = (mid, hi) if ent > e0 else (lo, mid)
        model.head.weight.mul_(lo)
        model.head.bias.mul_(lo)
    return model


def image_size(model) -> tuple:
    return tuple(model.patch_embed.img_size)


def tokens_per_image(model) -> int:
    return model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)


def build_providers(base: nn.Module, providers: list, device: str, imse_retrieval: str = "none"):
    """Returns name -> (adapter callable, model it runs on, training?)."""
    out = {}
    for p in providers:
        m = copy.deepcopy(base)
        if p == "imse":
            from imse_kernels.tta import IMSE, IMSEConfig

            out[p] = (IMSE(m, IMSEConfig(retrieval=imse_retrieval)), m)
        elif p == "imse_harness":
            spectralize(m)
            out[p] = (HandIMSE(m, FusedSpectralLinear, all_s_grad=False), m)
        elif p == "imse_compiled":
            from imse_kernels.tta import IMSE, IMSEConfig

            out[p] = (IMSE(m, IMSEConfig(retrieval=imse_retrieval), compile=True), m)
        elif p == "imse_cudagraphs":
            from imse_kernels.tta import IMSE, IMSEConfig

            if device != "cuda":
                raise SystemExit("model_bench: imse_cudagraphs needs --device cuda (CUDA graphs)")
            out[p] = (IMSE(m, IMSEConfig(retrieval=imse_retrieval), compile={"mode": "reduce-overhead"}), m)
        elif p == "imse_reference":
            reference_spectralize(m)
            out[p] = (HandIMSE(m, ReferenceSVDLinear, all_s_grad=True), m)
        elif p == "imse_reference_compiled":
            reference_spectralize(m)
            out[p] = (HandIMSE(m, ReferenceSVDLinear, all_s_grad=True, compile=True), m)
        elif p == "tent":
            try:
                from imse_kernels.tta import Tent
            except ImportError:
                Tent = None
            out[p] = (Tent(m, lr=1e-3) if Tent else _HandTent(m), m)
        elif p == "source":
            m.eval().requires_grad_(False)
            out[p] = (_inference(m), m)
        elif p == "source_spectral":
            spectralize(m)
            m.eval()
            out[p] = (_inference(m), m)
        else:
            raise ValueError(f"unknown model-level provider {p!r}")
    return out


def _inference(model):
    @torch.no_grad()
    def run(x):
        return model(x)
    return run


class _HandTent:
    """Fallback when imse_kernels.tta is missing: LayerNorm affine, mean entropy, Adam."""

    def __init__(self, model, lr=1e-3):
        self.model = model.train().requires_grad_(False)
        self.params = [p for mod in model.modules() if isinstance(mod, nn.LayerNorm) for p in mod.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=lr)

    @torch.enable_grad()
    def __call__(self, x):
        logits = self.model(x)
        _entropy(logits).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return logits.detach()


def key(provider: str, precision: str) -> str:
    return f"{provider}@{precision}"


def run_model_case(name: str, batch: int, device: str, precisions: list, providers: list, built: dict,
                   rounds: int, warmup: int, min_rounds: int, max_case_s: float, min_block_s: float = 0.0,
                   memory: bool = True, log=print) -> list:
    """Every provider in every precision, side by side in one interleaved loop (paired ratios).

    `built[precision][provider]` = (adapter, model); fp32 runs plainly, bf16/fp16 under
    `imse_kernels.precision.autocast` and bf16-torch under plain `torch.autocast` (bench_common.AMP_DTYPES;
    s and the optimizer state stay float32). Besides the speedup over the
    reference step in the same precision, every record carries its speedup over the same provider in fp32
    (`speedup_vs_fp32`) and over the reference step in fp32 (`speedup_vs_reference_fp32`)."""
    any_model = next(iter(next(iter(built.values())).values()))[1]
    tokens = tokens_per_image(any_model)
    x = torch.randn(batch, 3, *image_size(any_model), device=device)

    def wrap(adapter, precision):
        def fn():
            with BC.amp_context(device, precision):
                return adapter(x)
        return fn

    fns = {key(p, prec): wrap(built[prec][p][0], prec) for prec in precisions for p in providers}
    timings = measure_interleaved(fns, device, rounds, min_block_s, warmup, min_rounds=min_rounds,
                                  max_case_s=max_case_s, log=log)
    load = load1()
    ref32, records = timings.get(key(REFERENCE, "fp32")), []
    for prec in precisions:
        ref = timings.get(key(REFERENCE, prec))
        for p in providers:
            t, same32 = timings[key(p, prec)], timings.get(key(p, "fp32"))
            lo, hi = t.quartiles()
            med = t.median()
            rec = Record(level="model", case=name, batch=batch, tokens=batch * tokens,
                         mode="infer" if p.startswith("source") else "step", dtype=prec,
                         provider=p, median_ms=med * 1e3, min_ms=t.min() * 1e3, q1_ms=lo * 1e3, q3_ms=hi * 1e3,
                         rounds=len(t.times), number=t.number, baseline=REFERENCE,
                         ratio_vs_baseline=paired_ratio(t, ref) if ref else math.nan,
                         speedup_vs_reference=paired_ratio(ref, t) if ref else math.nan,
                         ratio_vs_baseline_min=min_ratio(t, ref) if ref else math.nan,
                         speedup_vs_reference_min=min_ratio(ref, t) if ref else math.nan,
                         items_per_s=batch / med if med == med and med > 0 else math.nan, load1=load,
                         error=t.error or "")
            if prec != "fp32" and same32 is not None:
                rec.speedup_vs_fp32, rec.speedup_vs_fp32_min = paired_ratio(same32, t), min_ratio(same32, t)
            if ref32 is not None:
                rec.speedup_vs_reference_fp32 = paired_ratio(ref32, t)
                rec.speedup_vs_reference_fp32_min = min_ratio(ref32, t)
            compiled = p in COMPILED_PROVIDERS  # FlopCounterMode and saved-tensor hooks would retrace the graphs
            fn = fns[key(p, prec)]
            if t.ok and not compiled:
                rec.gflop = count_gflop(fn)
            if memory and t.ok and not compiled:
                model = built[prec][p][1]
                exclude = list(model.parameters()) + list(model.buffers())
                # cached recomposed weights and cast factors (frozen-s layers, autocast) persist like weights
                exclude += [c for m in model.modules() if isinstance(m, FusedSpectralLinear)
                            for c in m._weight_cache.tensors()]
                tracker = SavedTensorTracker(exclude)
                with tracker.track():
                    fn()
                rec.saved_mb = tracker.peak / 2**20
                peak, method = device_peak_bytes(fn, device)
                rec.peak_mb, rec.peak_method = (peak / 2**20 if peak is not None else math.nan), method
            records.append(rec)
    return records


def count_gflop(fn) -> float:
    """GEMM and convolution GFLOP of one call, counted by `FlopCounterMode` on the torch backend (the
    compiled kernels are opaque to it). Attention (fused SDPA) is not counted; it is the same in every
    provider. The ratio of two providers' counts bounds their speed ratio when both run GEMMs equally fast."""
    from torch.utils.flop_counter import FlopCounterMode

    with imse_kernels.use_backend("torch"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------------------------
# The script: flags, defaults, the measuring loop

def add_args(ap) -> None:
    ap.add_argument("--models", default=None, help="vit_tiny,vit_small (cpu default) / vit_base (cuda default)")
    ap.add_argument("--model-batches", default=None, help="default 1,8 (cpu) / 8,64 (cuda)")
    ap.add_argument("--model-providers", default=None, help="default: " + ",".join(PROVIDERS))
    ap.add_argument("--model-depth", type=int, default=None, help="override the ViT depth (smoke runs)")
    ap.add_argument("--model-img-size", type=int, default=None,
                    help="override the image size (smoke runs; default 224)")
    BC.add_precisions_arg(ap)
    ap.add_argument("--imse-retrieval", default="none", help="IMSEConfig.retrieval for the imse provider")


def resolve(args, ap) -> None:
    args.models = BC.csv_list(BC.default(args, args.models, "vit_tiny,vit_small", "vit_base", "vit_tiny"))
    args.model_batches = [int(b) for b in BC.csv_list(BC.default(args, args.model_batches, "1,8", "8,64", "2"))]
    args.precisions = BC.csv_list(BC.default(args, args.precisions, "fp32", "fp32,bf16", "fp32"))
    for t in args.precisions:
        if t not in BC.PRECISIONS:
            ap.error(f"--precisions: unknown {t!r}; choose from {', '.join(BC.PRECISIONS)}")
    if args.quick:
        args.model_depth = args.model_depth or 4  # IMSE needs > 3 blocks (3 diversity blocks)
        args.model_img_size = args.model_img_size or 64


def run(args, records: list, log=print) -> None:
    """Measure every selected model and batch, every precision side by side; appends to `records` as it goes."""
    device = args.device
    wanted = BC.csv_list(args.model_providers) or list(PROVIDERS)
    if args.quick and not args.model_providers:
        wanted = ["imse", "imse_harness", "imse_reference", "source"]
    if not tta_available():
        log("imse_kernels.tta is not importable: the imse provider is skipped, Tent uses the hand-written fallback")
        wanted = [p for p in wanted if p != "imse"]
    precisions = BC.usable_precisions(args.precisions, device, log)
    if not precisions:
        return
    for name in args.models:
        base = make_model(name, device, depth=args.model_depth, img_size=args.model_img_size)
        built = {prec: build_providers(base, wanted, device, imse_retrieval=args.imse_retrieval) for prec in precisions}
        label = name + (f"-depth{args.model_depth}" if args.model_depth else "") + (
            f"-img{args.model_img_size}" if args.model_img_size else "")
        for b in args.model_batches:
            t0 = time.perf_counter()
            recs = run_model_case(label, b, device, precisions, wanted, built, args.rounds, args.warmup,
                                  args.min_rounds, args.max_case_s * 4 * len(precisions),
                                  min_block_s=args.min_block_s, memory=not args.no_memory, log=log)
            records += recs
            log(f"[model] {label} b{b}: " + " ".join(f"{r.provider}@{r.dtype}={BC.fmt(r.median_ms)}ms" for r in recs)
                + f"  ({time.perf_counter() - t0:.1f}s)")
        del built, base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    BC.add_common_args(ap)
    add_args(ap)
    args = ap.parse_args(argv)
    BC.resolve_common(args, ap)
    resolve(args, ap)
    return report.run(args, [lambda records, log: run(args, records, log)], "model")


if __name__ == "__main__":
    sys.exit(main())
