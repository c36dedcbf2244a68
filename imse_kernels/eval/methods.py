"""The compared methods, built fresh on a private copy of the model so every method sees the same weights."""
import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from torch import nn

#: name -> what it is (the CLI's --method choices).
METHODS = {
    "source": "the unadapted model",
    "tent": "Tent: entropy minimisation of LayerNorm affine parameters",
    "sar": "SAR: sharpness-aware reliable entropy minimisation with model recovery",
    "eata": "EATA: filtered, re-weighted entropy minimisation with a Fisher regulariser",
    "cotta": "CoTTA: mean teacher, augmentation-averaged pseudo-labels, stochastic restore",
    "deyo": "DeYO: entropy and PLPD (patch-shuffle) filtered, re-weighted entropy minimisation",
    "imse": "IMSE, top-1 code retrieval",
    "imse-mix": "IMSE, mixture code retrieval (softmax(-KL/T))",
    "imse-nodiv": "IMSE top-1 with diversity weight 0 (entropy only; ablation)",
}
#: what `--method all` runs; the IMSE ablations ("imse-mix", "imse-nodiv") are selected by name.
DEFAULT_METHODS = ("source", "tent", "sar", "eata", "cotta", "deyo", "imse")


@dataclass
class MethodOptions:
    """Hyper-parameters the CLI exposes; None keeps the adapter's own default."""

    tent_lr: Optional[float] = None
    tent_optimizer: Optional[str] = None  # "adam" or "sgd": Tent's optim=
    imse_lr: Optional[float] = None
    imse_overrides: dict = field(default_factory=dict)
    compile: "bool | str | dict" = False  # torch.compile of forward + loss in Tent and the IMSE variants
    seed: int = 0  # the generators of CoTTA (augmentations, restore masks) and DeYO (patch shuffles)
    process_group: Any = None  # torch.distributed group: data-parallel IMSE variants (eval.distributed)


def parse_methods(spec) -> list[str]:
    """'all' or a comma-separated list of METHODS keys (order kept, duplicates dropped)."""
    if spec in (None, "all"):
        return list(DEFAULT_METHODS)
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)} or all")
    return list(dict.fromkeys(names))


def imse_config(name: str, opts: MethodOptions):
    """The IMSEConfig of an IMSE variant."""
    from ..tta import IMSEConfig

    kw = dict(opts.imse_overrides)
    if opts.imse_lr is not None:
        kw["lr"] = opts.imse_lr
    if name == "imse-mix":
        kw["retrieval"] = "mix"
    elif name == "imse-nodiv":
        kw["diversity_weight"] = 0.0
    return IMSEConfig(**kw)


def build_method(name: str, model: nn.Module, opts: MethodOptions, source_batches: Optional[Iterable] = None):
    """A fresh adapter for `name` on a deep copy of `model`. With `source_batches` (clean images) the IMSE
    variants record the source statistics of the code bank's entry 0 and EATA its Fisher regulariser (without
    them EATA runs unregularised). SAR, EATA, CoTTA and DeYO use their configs' defaults."""
    from ..tta import (EATA, IMSE, SAR, CoTTA, CoTTAConfig, DeYO, DeYOConfig, EATAConfig, SARConfig, Source,
                       Tent)

    m = copy.deepcopy(model)
    if name == "source":
        return Source(m)
    if name == "tent":
        kw = {}
        if opts.tent_lr is not None:
            kw["lr"] = opts.tent_lr
        if opts.tent_optimizer is not None:
            kw["optim"] = opts.tent_optimizer
        return Tent(m, compile=opts.compile, **kw)
    if name == "sar":
        return SAR(m, SARConfig())
    if name == "eata":
        return EATA(m, EATAConfig(), source_batches=source_batches)
    if name == "cotta":
        return CoTTA(m, CoTTAConfig(seed=opts.seed))
    if name == "deyo":
        return DeYO(m, DeYOConfig(seed=opts.seed))
    if name in ("imse", "imse-mix", "imse-nodiv"):
        adapter = IMSE(m, imse_config(name, opts), compile=opts.compile, process_group=opts.process_group)
        if source_batches is not None:
            adapter.source_statistics(source_batches)
        return adapter
    raise ValueError(f"unknown method {name!r}")
