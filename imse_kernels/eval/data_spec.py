"""Where the images and the model come from: `DataSpec` -> `build_data` -> `Data` (docs/design.md, sections 12, 13).

A data source is a name in `DATA_SOURCES` and a builder function `DataSpec -> Data` in `BUILDERS`; the check
stage validates a spec (`DataSpec.check`: folders and files that do not exist) before anything is loaded, and
the set-up stage calls `build_data`. The sources: the built-in digits, ImageNet-C folder trees
(`eval/imagenet_c.py`) and CIFAR-10-C / CIFAR-100-C `.npy` files (`eval/cifar_c.py`), the last two with a timm
model from a local checkpoint (`eval/models.py`).
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .checks import DATA_SETS, check_labels_fit
from .errors import DataError
from .protocol import DataProtocol
from .usage import UsageError

DATA_SOURCES = DATA_SETS

#: What each folder data set's --data-dir holds (for the messages).
LAYOUTS = {"imagenet-c": ("ImageNet-C", "<corruption>/<severity>/<class>/<image>"),
           "cifar10-c": ("CIFAR-10-C", "labels.npy and <corruption>.npy"),
           "cifar100-c": ("CIFAR-100-C", "labels.npy and <corruption>.npy")}


@dataclass(frozen=True)
class DataSpec:
    """What to load. `source` names the data set; the other fields apply to the sources that read them
    (`checks.APPLIES_TO`; `eval.run_config.RunConfig` has already refused the ones that do not)."""

    source: str
    corruptions: tuple[str, ...]          # ("all",): every corruption present (folder data)
    severities: tuple[int, ...]
    batch_size: int                       # of the clean source batches (EATA's Fisher, IMSE's statistics)
    n_test: Optional[int] = 512           # digits: test images per domain
    train_steps: Optional[int] = None     # digits: training steps of the embedded ViT
    cache_dir: Optional[str] = None       # digits: where the embedded ViT is cached
    data_dir: Optional[str] = None        # folder data: the data set's folder
    source_dir: Optional[str] = None      # imagenet-c: clean images (ImageFolder) for the source data
    model: Optional[str] = None           # folder data: timm model name (or hf-hub:<repo>)
    checkpoint: Optional[str] = None      # folder data: local weights file or model directory
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    max_per_domain: Optional[int] = None
    subset: Optional[str] = None          # imagenet-c: "5000" or "full"
    preprocess: Optional[str] = None      # imagenet-c: preprocess.PREPROCESS
    label_map: Optional[str] = None       # imagenet-c: label map file
    image_check: Optional[str] = None     # imagenet-c: images.SCAN_MODES
    skip_unreadable: bool = False         # imagenet-c
    report: str = "accuracy"              # error or accuracy
    workers: int = 0
    seed: int = 0                         # the run's first seed: the domains loaded while checking the data

    def check(self) -> None:
        """Raise `DataError` for folders and files that do not exist, before anything is loaded."""
        if self.source not in BUILDERS:
            raise UsageError(f"unknown data source {self.source!r}; choose from {', '.join(BUILDERS)}")
        if self.source == "digits":
            return
        name, layout = LAYOUTS[self.source]
        if not self.data_dir:
            raise DataError(None, f"--data {self.source} needs --data-dir DIR", f"give the folder that holds {layout}")
        root = Path(self.data_dir).expanduser()
        if not root.is_dir():
            raise DataError(root, f"{name} directory not found" if not root.exists() else "not a directory",
                            f"give --data-dir the folder that holds {layout}")
        if not self.model and not self.checkpoint:
            raise DataError(None, f"--data {self.source} needs a model: --model NAME --checkpoint FILE",
                            "e.g. --model vit_base_patch16_224 --checkpoint weights.safetensors "
                            "(nothing is downloaded)")
        if self.checkpoint and not Path(self.checkpoint).expanduser().exists():
            raise DataError(self.checkpoint, "checkpoint file not found",
                            "give --checkpoint the path of a local weights file or model directory")
        for flag, value in (("--source-dir", self.source_dir), ("--label-map", self.label_map)):
            if value and not Path(value).expanduser().exists():
                raise DataError(value, "not found", f"give {flag} an existing {'folder' if 'dir' in flag else 'file'}")


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
    protocol: Optional[DataProtocol] = None   # the header line and results.json's `protocol`
    corruptions: tuple = ()       # the corruptions read (a folder's `all` resolved)
    warnings: list = field(default_factory=list)  # printed on stderr and recorded


def images_per_domain(domains) -> int:
    """Images per domain of a loaded data set (the digits' test split, an ImageNet-C subset, a CIFAR-C block)."""
    if hasattr(domains, "test"):
        return len(domains.test)
    return domains.images_per_domain


def _digits(spec: DataSpec, log: Callable[[str], None]) -> Data:
    from .corruptions import CORRUPTIONS
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
    protocol = DataProtocol("digits", f"scikit-learn digits test split, corrupted in torch (scale {probe.scale})",
                            spec.n_test, "fixed order", None, spec.report)
    corruptions = CORRUPTIONS if spec.corruptions == ("all",) else spec.corruptions
    return Data(model, lambda seed: CorruptedDigits(test, seed=seed), source, info, info["cache"],
                f"embedded digits ViT (timm VisionTransformer, digits_vit_{cfg.key()})",
                {"embedded_model_training": cfg.seed, "test_split": cfg.seed}, spec.n_test, protocol,
                tuple(corruptions))


def _timm_model(spec: DataSpec, log: Callable[[str], None], warnings: list):
    """The timm model of --model / --checkpoint (`models.build_timm_model`); its warnings and notes logged."""
    from .models import build_timm_model

    loaded = build_timm_model(spec.model, spec.checkpoint, num_classes=spec.num_classes, img_size=spec.img_size,
                              patch_size=spec.patch_size)
    for w in loaded.warnings:
        warnings.append(w)
        log(w if w.startswith("warning") else f"warning: {w}")
    if loaded.container != "top level" or loaded.stripped:
        log(f"note: {loaded.checkpoint}: weights read from {loaded.container}"
            + (f", key prefix {' + '.join(repr(p) for p in loaded.stripped)} removed" if loaded.stripped else ""))
    for n in loaded.notes:
        log(f"note: {loaded.checkpoint}: {n}")
    return loaded


def _model_info(loaded) -> dict:
    return {**loaded.info(), "data_config": {k: loaded.data_config[k] for k in loaded.data_config}}


def _image_check(data, spec: DataSpec, log: Callable[[str], None], where: str = "") -> dict:
    """Every chosen image file checked before the run (`ImageNetC.check_images`); what was left out, logged."""
    found = data.check_images(mode=spec.image_check or "header", skip_unreadable=spec.skip_unreadable)
    skipped = found["skipped"]
    if skipped:
        log(f"warning: {len(skipped)} unreadable image(s){where} left out of every domain (--skip-unreadable), "
            f"e.g. {skipped[0]}")
    return {"mode": spec.image_check or "header", "checked": found["checked"], "skipped_count": len(skipped),
            "skipped": skipped}


def _source_batches(spec: DataSpec, preprocess, log: Callable[[str], None], limit: int = 2048) -> Optional[list]:
    """Up to `limit` clean images of the --source-dir ImageFolder tree (a fixed random subset), read with the
    run's pipeline, in batches; unreadable files are an error or, with --skip-unreadable, left out."""
    if not spec.source_dir:
        return None
    from .imagenet_c import ImageFolderDomain, class_index, list_images
    from .images import scan_images, unreadable_error

    root = Path(spec.source_dir).expanduser()
    rel = list_images(root)
    if not rel:
        raise DataError(root, "no images under --source-dir", "give a folder of <class>/<image> files (ImageFolder)")
    gen = torch.Generator().manual_seed(0)
    rel = [rel[i] for i in torch.randperm(len(rel), generator=gen)[:limit].tolist()]
    scan = scan_images(root, rel, spec.image_check or "header", spec.workers)
    if scan.unreadable:
        if not spec.skip_unreadable:
            raise unreadable_error(root, scan)
        log(f"warning: {len(scan.unreadable)} unreadable --source-dir image(s) left out, e.g. {scan.unreadable[0][0]}")
        rel = scan.ok
    dom = ImageFolderDomain(root, rel, class_index(sorted({Path(r).parts[0] for r in rel})), workers=spec.workers,
                            preprocess=preprocess)
    return [x for x, _ in dom.batches(spec.batch_size)]


def _imagenet_c(spec: DataSpec, log: Callable[[str], None]) -> Data:
    from .imagenet_c import ImageNetC
    from .images import load_label_map
    from .preprocess import build_preprocess, check_input_size

    warnings: list = []
    loaded = _timm_model(spec, log, warnings)
    size = int(loaded.data_config["input_size"][-1])
    pre = build_preprocess(spec.preprocess, loaded.data_config)
    check_input_size(pre, size, f"{loaded.name} as built")
    label_map = load_label_map(spec.label_map) if spec.label_map else None
    corruptions = "all" if spec.corruptions == ("all",) else list(spec.corruptions)
    checks: dict = {}

    def data_for(seed: int) -> ImageNetC:
        d = ImageNetC(spec.data_dir, corruptions, list(spec.severities), max_per_domain=spec.max_per_domain,
                      seed=seed, workers=spec.workers, preprocess=pre, subset=spec.subset, label_map=label_map)
        checks[seed] = _image_check(d, spec, log, f" (seed {seed})" if spec.subset == "full" else "")
        return d

    first = data_for(spec.seed)
    check_labels_fit(first.num_classes, loaded.num_classes, str(first.root))
    w = first.label_warning(loaded.num_classes)
    if w:
        warnings.append(w)
        log(w)
    source = _source_batches(spec, pre, log)
    info = {**_model_info(loaded), "image_check": checks[spec.seed]}
    if spec.subset == "5000":  # the same images, in the same order, for every seed
        domains = lambda seed: first  # noqa: E731
    else:
        cached = {spec.seed: first}
        domains = lambda seed: cached.pop(seed, None) or data_for(seed)  # noqa: E731
    return Data(loaded.model, domains, source, info, loaded.checkpoint, loaded.name,
                {"source_subset": 0} if spec.source_dir else {}, first.images_per_domain,
                first.protocol(spec.report), tuple(first.corruptions), warnings)


def _cifar_c(spec: DataSpec, log: Callable[[str], None]) -> Data:
    from .cifar_c import CifarC

    warnings: list = []
    loaded = _timm_model(spec, log, warnings)
    size = int(loaded.data_config["input_size"][-1])
    corruptions = "all" if spec.corruptions == ("all",) else list(spec.corruptions)
    data = CifarC(spec.data_dir, spec.source, corruptions, list(spec.severities), n_examples=spec.max_per_domain)
    check_labels_fit(data.num_classes, loaded.num_classes, str(data.root / "labels.npy"))
    protocol = data.protocol(spec.report)
    if size != data.image_size:  # a model built for another input size: resized batch by batch, and said so
        data.size = size
        how = f"bilinear resize {data.image_size} -> {size} px (antialiased, torch F.interpolate)"
        log(f"note: {data.root}: {data.image_size}-px images resized to the model's {size} px ({how})")
        protocol = replace(protocol, preprocess={"name": f"resize{size}", "output_size": size, "pipeline": how})
    return Data(loaded.model, lambda seed: data, None, _model_info(loaded), loaded.checkpoint, loaded.name, {},
                data.images_per_domain, protocol, tuple(data.corruptions), warnings)


#: data source name -> builder.
BUILDERS: dict[str, Callable[[DataSpec, Callable[[str], None]], Data]] = {
    "digits": _digits, "imagenet-c": _imagenet_c, "cifar10-c": _cifar_c, "cifar100-c": _cifar_c}


def build_data(spec: DataSpec, log: Callable[[str], None] = print) -> Data:
    """Load what `spec` names (after `spec.check()`)."""
    spec.check()
    return BUILDERS[spec.source](spec, log)


def spec_from_run(run, cache_dir: Optional[str] = None, workers: int = 0) -> DataSpec:
    """The data spec of a `RunConfig` (`eval.run_config`); `cache_dir` and `workers` are options of the
    invocation, not of the run."""
    return DataSpec(run.data, tuple(run.corruptions), tuple(run.severities), run.batch_size, run.n_test,
                    run.train_steps, cache_dir, run.data_dir, run.source_dir, run.model, run.checkpoint,
                    run.num_classes, run.img_size, run.patch_size, run.max_per_domain, run.subset, run.preprocess,
                    run.label_map, run.image_check, run.skip_unreadable, run.report, workers, run.seeds[0])


__all__ = ["DATA_SOURCES", "DataSpec", "Data", "build_data", "spec_from_run", "images_per_domain"]
