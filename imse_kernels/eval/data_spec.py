"""Where the images and the model come from: `DataSpec` -> `build_data` -> `Data` (docs/design.md, section 12).

A data source is a name in `DATA_SOURCES` and a builder function `DataSpec -> Data` in `BUILDERS`; the check
stage validates a spec (`DataSpec.check`: options that do not apply, paths that do not exist) before
anything is loaded, and the set-up stage calls `build_data`. Adding a source (e.g. CIFAR-10-C) is a builder
and its name here.
"""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .usage import UsageError

DATA_SOURCES = ("digits", "imagenet-c")


@dataclass(frozen=True)
class DataSpec:
    """What to load. `source` names the data set; the other fields apply to the sources that read them."""

    source: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    batch_size: int                       # of the clean source batches (EATA's Fisher, IMSE's statistics)
    n_test: int = 512                     # digits: test images per domain
    train_steps: Optional[int] = None     # digits: training steps of the embedded ViT
    cache_dir: Optional[str] = None       # digits: where the embedded ViT is cached
    data_dir: Optional[str] = None        # imagenet-c: DIR/<corruption>/<severity>/<class>/
    source_dir: Optional[str] = None      # imagenet-c: clean images (ImageFolder) for the source data
    model: Optional[str] = None           # imagenet-c: timm model name
    checkpoint: Optional[str] = None      # imagenet-c: local weights file
    num_classes: Optional[int] = None
    max_per_domain: Optional[int] = None
    workers: int = 0
    seed: int = 0                         # the run's first seed: the domains loaded while checking the data

    def check(self) -> None:
        """Raise `UsageError` for options that do not apply to the source and for paths that do not exist."""
        if self.source not in BUILDERS:
            raise UsageError(f"unknown data source {self.source!r}; choose from {', '.join(BUILDERS)}")
        if self.source == "digits":
            if self.model or self.checkpoint:
                if not self.checkpoint or not self.model:
                    raise UsageError("--model and --checkpoint go together")
                raise UsageError("--model/--checkpoint apply to --data imagenet-c; the digits default uses its own ViT")
            return
        if not self.data_dir:
            raise UsageError("--data imagenet-c needs --data-dir DIR (layout DIR/<corruption>/<severity>/<class>/...)")
        if not Path(self.data_dir).expanduser().is_dir():
            raise UsageError(f"ImageNet-C directory not found: {self.data_dir}")
        if not self.model:
            raise UsageError("--data imagenet-c needs --model NAME --checkpoint FILE (e.g. vit_base_patch16_224)")
        if self.checkpoint and not Path(self.checkpoint).expanduser().is_file():
            raise UsageError(f"checkpoint file not found: {self.checkpoint}")
        if self.source_dir and not Path(self.source_dir).expanduser().is_dir():
            raise UsageError(f"--source-dir not found: {self.source_dir}")


@dataclass
class Data:
    """What a source gives the run: the model (taking [0, 1] images), the corrupted domains per seed
    (`domains(seed).domain(corruption, severity)`), clean source batches (or None) and what to record."""

    model: nn.Module
    domains: Callable[[int], Any]
    source: Optional[list]
    info: dict
    checkpoint: Optional[str]     # the model's weights file (its SHA-256 is recorded)
    model_name: str
    fixed_seeds: dict             # seeds of the data that do not change with the run's seed
    domain_size: Optional[int]    # images per domain, when known before a domain is loaded


def images_per_domain(domains) -> int:
    """Images per domain of a loaded data set (the digits' test split, or an ImageNet-C subset)."""
    return len(domains.test) if hasattr(domains, "test") else len(domains.relpaths)


def _digits(spec: DataSpec, log: Callable[[str], None]) -> Data:
    from .digits import load_splits
    from .embedded import CorruptedDigits
    from .models import EmbeddedConfig, load_or_train_embedded

    cfg = EmbeddedConfig(n_test=spec.n_test)
    if spec.train_steps is not None:
        cfg = replace(cfg, steps=spec.train_steps)
    train, test = load_splits(n_test=cfg.n_test, seed=cfg.seed, size=cfg.img_size)
    model, info = load_or_train_embedded(cfg, train, test, spec.cache_dir, log=log)
    source = [train.images[i:i + spec.batch_size] for i in range(0, len(train), spec.batch_size)]
    probe = CorruptedDigits(test, seed=0)
    info = {**info, "train_images": len(train), "test_images": len(test), "corruption_scale": probe.scale}
    return Data(model, lambda seed: CorruptedDigits(test, seed=seed), source, info, info["cache"],
                f"embedded digits ViT (timm VisionTransformer, digits_vit_{cfg.key()})",
                {"embedded_model_training": cfg.seed, "test_split": cfg.seed}, spec.n_test)


def _source_batches(source_dir: Optional[str], cfg: dict, batch_size: int, limit: int = 2048) -> Optional[list]:
    """Up to `limit` clean images of an ImageFolder tree (a fixed random subset), in batches."""
    if not source_dir:
        return None
    from .imagenet_c import ImageFolderDomain, _list_images, class_index

    root = Path(source_dir).expanduser()
    rel = _list_images(root)
    if not rel:
        raise UsageError(f"no images under --source-dir {root} (expected <class>/<image>)")
    gen = torch.Generator().manual_seed(0)
    rel = [rel[i] for i in torch.randperm(len(rel), generator=gen)[:limit].tolist()]
    dom = ImageFolderDomain(root, rel, class_index(sorted({Path(r).parts[0] for r in rel})), cfg["input_size"][-1],
                            cfg.get("crop_pct", 1.0), cfg.get("interpolation", "bilinear"))
    return [x for x, _ in dom.batches(batch_size)]


def _imagenet_c(spec: DataSpec, log: Callable[[str], None]) -> Data:
    from .imagenet_c import ImageNetC
    from .models import load_timm_model

    model, cfg = load_timm_model(spec.model, spec.checkpoint, spec.num_classes)

    def data_for(seed: int) -> ImageNetC:
        return ImageNetC(spec.data_dir, list(spec.corruptions), list(spec.severities), cfg["input_size"][-1],
                         cfg.get("crop_pct", 1.0), cfg.get("interpolation", "bilinear"), spec.max_per_domain, seed,
                         spec.workers)

    first = data_for(spec.seed)
    head = getattr(model, "num_classes", None)
    if head is not None and first.num_classes > head:
        raise UsageError(f"the data has class index {first.num_classes - 1} but the model has {head} outputs")
    source = _source_batches(spec.source_dir, cfg, spec.batch_size)
    info = {"model": spec.model, "checkpoint": str(spec.checkpoint), "data_config": {k: cfg[k] for k in cfg}}
    cached = {spec.seed: first}
    return Data(model, lambda seed: cached.pop(seed, None) or data_for(seed), source, info, spec.checkpoint,
                spec.model, {"source_subset": 0}, None)


#: data source name -> builder.
BUILDERS: dict[str, Callable[[DataSpec, Callable[[str], None]], Data]] = {"digits": _digits, "imagenet-c": _imagenet_c}


def build_data(spec: DataSpec, log: Callable[[str], None] = print) -> Data:
    """Load what `spec` names (after `spec.check()`)."""
    spec.check()
    return BUILDERS[spec.source](spec, log)


def spec_from_run(run, cache_dir: Optional[str] = None, workers: int = 0) -> DataSpec:
    """The data spec of a `RunConfig` (`eval.run_config`); `cache_dir` and `workers` are options of the
    invocation, not of the run."""
    return DataSpec(run.data, tuple(run.corruptions), tuple(run.severities), run.batch_size, run.n_test,
                    run.train_steps, cache_dir, run.data_dir, run.source_dir, run.model, run.checkpoint,
                    run.num_classes, run.max_per_domain, workers, run.seeds[0])


__all__ = ["DATA_SOURCES", "DataSpec", "Data", "build_data", "spec_from_run", "images_per_domain"]
