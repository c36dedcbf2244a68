"""Models for the evaluation: the embedded digits ViT (trained once, cached) and timm models from local files.

Input normalisation always comes from the model's timm data config and is folded into the model, so every
method receives images in [0, 1]: exactly into the patch-embedding convolution where that is exact (a ViT's
patch embedding has no padding), otherwise as a leading `Normalize` module.
"""
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..state_file import (
    StateFileError,
    atomic_write_bytes,
    atomic_write_text,
    dumps_safetensors,
    loads_safetensors,
    read_bytes,
)
from .cache import cache_dir
from .digits import IMG_SIZE, NUM_CLASSES, Split
from .errors import DataError

# ------------------------------------------------------------------------------------------ normalisation


class Normalize(nn.Module):
    """(x - mean) / std per channel, for models whose first layer cannot absorb it."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def data_config(model: nn.Module) -> dict:
    """timm's resolved data config (input_size, mean, std, interpolation, crop_pct) for `model`."""
    import timm.data

    return timm.data.resolve_model_data_config(model)


@torch.no_grad()
def fold_normalization(model: nn.Module, mean, std) -> nn.Module:
    """Return a model that takes [0, 1] images: mean/std folded into `patch_embed.proj` when exact, else wrapped."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    std = torch.as_tensor(std, dtype=torch.float64)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    exact = (isinstance(proj, nn.Conv2d) and proj.padding in ((0, 0), 0, "valid") and proj.groups == 1
             and proj.in_channels == mean.numel())
    if not exact:
        return nn.Sequential(Normalize(mean.float(), std.float()), model)
    w = proj.weight.double()  # conv((x - m) / s) = conv_{W/s}(x) - sum(W * m / s)
    shift = (w * (mean / std).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    proj.weight.copy_((w / std.view(1, -1, 1, 1)).to(proj.weight.dtype))
    if proj.bias is None:
        proj.bias = nn.Parameter(torch.zeros(proj.out_channels, dtype=proj.weight.dtype, device=proj.weight.device),
                                 requires_grad=False)
    proj.bias.copy_((proj.bias.double() - shift).to(proj.bias.dtype))
    return model


# ------------------------------------------------------------------------------------- timm + checkpoint


@dataclass
class LoadedModel:
    """A timm model with a checkpoint's weights, taking [0, 1] images, and how the file was read."""

    model: nn.Module
    data_config: dict
    name: str                      #: the timm architecture
    checkpoint: str                #: the weights file read (a directory or hf-hub name resolved to it)
    num_classes: Optional[int]
    format: str                    #: safetensors, torch-zip, torch-legacy, npz
    container: str = "top level"   #: where the weights were in the file
    stripped: list = field(default_factory=list)  #: key prefixes removed
    notes: list = field(default_factory=list)     #: for the log (EMA weights present, keys left out, stand-ins)
    warnings: list = field(default_factory=list)  #: for the user (embeddings resampled)

    def info(self) -> dict:
        """What a results file records about the model."""
        return {"model": self.name, "checkpoint": self.checkpoint, "checkpoint_format": self.format,
                "weights_at": self.container, "stripped_prefixes": list(self.stripped), "num_classes": self.num_classes,
                "notes": list(self.notes), "warnings": list(self.warnings)}


def _model_spec(name: Optional[str], checkpoint: Optional[str]) -> tuple[str, Optional[Path], Optional[dict]]:
    """(timm architecture, weights file, timm config.json or None) for --model / --checkpoint."""
    import timm

    from .checkpoints import HF_PREFIX, resolve_checkpoint

    config = None
    path = None
    if name and name.startswith(HF_PREFIX) and not checkpoint:
        path, config = resolve_checkpoint(name)
    elif checkpoint:
        path, config = resolve_checkpoint(checkpoint)
    elif name:
        raise DataError(None, f"--model {name} needs --checkpoint FILE (a local weights file); nothing is downloaded",
                        f"pass --checkpoint, or --model {HF_PREFIX}<repo> for a model in the local Hugging Face cache")
    arch = name
    if not name or name.startswith(HF_PREFIX):  # the snapshot's config.json, else the repo's name (timm/<model>)
        arch = (config or {}).get("architecture") or (name or "").split("/")[-1] or None
    if not arch:
        raise DataError(checkpoint or name, "no model architecture given", "pass --model NAME (a timm model name)")
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise DataError(None, f"unknown timm model {arch!r}",
                        f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
    return arch, path, config


def build_timm_model(name: Optional[str], checkpoint: Optional[str], *, num_classes: Optional[int] = None,
                     img_size: Optional[int] = None, patch_size: Optional[int] = None,
                     use_ema: bool = False) -> LoadedModel:
    """A timm model built with these options and a local checkpoint's weights; never downloads.

    `checkpoint`: a weights file, a model directory, or None with `name` = `hf-hub:<repo>` (local cache only).
    `img_size` / `patch_size` build a ViT at another input or patch size (its data config says so too);
    `num_classes` the head's size. A file that does not fit is a DataError naming the keys and shapes that
    differ and what to pass (checkpoints.py).
    """
    import timm

    from . import checkpoints as ck

    arch, path, config = _model_spec(name, checkpoint)
    kwargs = dict((config or {}).get("model_args") or {})
    if num_classes is None and (config or {}).get("num_classes") is not None:
        num_classes = int(config["num_classes"])
    for key, value, flag in (("num_classes", num_classes, "--num-classes"), ("img_size", img_size, "--img-size"),
                             ("patch_size", patch_size, "--patch-size")):
        if value is not None:
            if int(value) != value or value < 1:
                raise DataError(None, f"{flag} must be a positive integer, got {value}", "")
            kwargs[key] = int(value)
    try:
        with torch.device("meta"):  # the model's keys and shapes, without allocating or initialising weights
            probe = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as exc:
        flags = [f for k, f in (("img_size", "--img-size"), ("patch_size", "--patch-size")) if k in kwargs]
        raise DataError(None, f"{arch} does not take {' / '.join(flags) or 'these options'} ({exc})",
                        "leave them out, or use a ViT --model") from None
    shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    outputs = getattr(probe, "num_classes", None)
    overlay = {"source": "", "url": None, "hf_hub_id": None, "file": None, "state_dict": None,
               **{k: v for k, v in ((config or {}).get("pretrained_cfg") or {}).items()
                  if k in ("mean", "std", "interpolation", "crop_pct", "crop_mode", "input_size")},
               "num_classes": outputs}
    if img_size is not None:
        overlay["input_size"] = (3, int(img_size), int(img_size))
    fmt = ck.sniff(path)
    state = None
    if fmt == "npz":
        overlay.update(file=str(path), custom_load=True)
    else:
        state = ck.strip_prefixes(ck.read_state_dict(path, use_ema), shapes)
        classifier = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier") or "head"
        err = ck.head_error(state, shapes, classifier if isinstance(classifier, str) else classifier[0], arch,
                            num_classes)
        if err is not None:
            raise err
        overlay.update(state_dict=state.tensors, custom_load=False)
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:  # timm's loaders raise RuntimeError, KeyError, ValueError, AssertionError, ...
        if state is None:
            raise DataError(path, f"timm's .npz loader could not read it into {arch} ({ck.reason(exc)})",
                            "give the .npz of this --model, or a safetensors / torch file") from None
        raise ck.mismatch_error(state, shapes, arch, exc) from None
    for cfg in {id(c): c for c in (model.pretrained_cfg, getattr(model, "default_cfg", None)) if c}.values():
        cfg.pop("state_dict", None)  # the file's tensors: not kept alive, never written to a results file
    notes, warnings = [], []
    if state is not None:
        notes = list(state.notes)
        if state.outside:
            notes.append(f"left out {len(state.outside)} keys outside {''.join(state.stripped)!r} "
                         f"(e.g. {state.outside[0]})")
        w = ck.resample_warning(state, probe, arch)
        if w:
            warnings.append(w)
    cfg = data_config(model)
    model = fold_normalization(model.eval(), cfg["mean"], cfg["std"]).eval()
    return LoadedModel(model, cfg, arch, str(path), outputs, fmt, state.container if state else "npz",
                       list(state.stripped) if state else [], notes, warnings)


def load_timm_model(name: Optional[str], checkpoint: Optional[str], num_classes: Optional[int] = None, *,
                    img_size: Optional[int] = None, patch_size: Optional[int] = None,
                    warn: Optional[Callable[[str], None]] = None) -> tuple[nn.Module, dict]:
    """`build_timm_model`, returning (model taking [0, 1] images, data config); warnings go to `warn`
    (default: Python's warnings)."""
    loaded = build_timm_model(name, checkpoint, num_classes=num_classes, img_size=img_size, patch_size=patch_size)
    for w in loaded.warnings:
        if warn is not None:
            warn(w)
        else:
            import warnings

            warnings.warn(w, stacklevel=2)
    return loaded.model, loaded.data_config


# ------------------------------------------------------------------------------------- embedded digits ViT


@dataclass(frozen=True)
class EmbeddedConfig:
    """Architecture and training recipe of the embedded model; its hash names the cache file."""

    img_size: int = IMG_SIZE
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 3
    seed: int = 0
    n_test: int = 512
    recipe: int = 2  # bump when the training code changes, so stale caches are not reused

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: The data config of the embedded model: its inputs are normalised with these before the patch embedding.
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.5, 0.5, 0.5)


def build_embedded(cfg: EmbeddedConfig) -> nn.Module:
    """The untrained timm VisionTransformer of the embedded default (inputs normalised by its data config)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3, num_classes=NUM_CLASSES,
                              embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                              mlp_ratio=cfg.mlp_ratio)
    model.pretrained_cfg = {"input_size": (3, cfg.img_size, cfg.img_size), "mean": EMBEDDED_MEAN, "std": EMBEDDED_STD,
                            "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": NUM_CLASSES}
    return model


def _augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (zero fill): the only augmentation, no corruption."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy.view(n, 1, 1) + torch.arange(h).view(1, h, 1)).expand(n, h, w)
    cols = (dx.view(n, 1, 1) + torch.arange(w).view(1, 1, w)).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` (taking [0, 1] images) on a split."""
    model.eval()
    correct = 0
    for i in range(0, len(split), batch_size):
        correct += (model(split.images[i:i + batch_size]).argmax(1) == split.labels[i:i + batch_size]).sum().item()
    return correct / len(split)


def train_embedded(cfg: EmbeddedConfig, train: Split,
                   progress: Optional[Callable[[int, float], None]] = None) -> nn.Module:
    """Train the embedded ViT on clean images (AdamW, warm-up + cosine, label smoothing); deterministic for cfg.seed.

    Runs on one CPU thread, so the weights do not depend on the thread count (reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, train, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: EmbeddedConfig, train: Split, progress) -> nn.Module:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = fold_normalization(build_embedded(cfg), EMBEDDED_MEAN, EMBEDDED_STD)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    n = len(train)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x = _augment(train.images[idx], cfg.max_shift, gen)
        loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


#: safetensors metadata key of the cached embedded model (training info, tensor manifest; see `state_file`).
_CACHE_KEY = "imse_kernels.embedded_model"


def _read_cached_model(path: Path, cfg: EmbeddedConfig) -> tuple[dict, dict]:
    """(state dict, training info) of a cached model: read whole, nothing unpickled, every tensor's SHA-256
    verified. Raises `StateFileError` when the file cannot be trusted (damaged, foreign, no checksums)."""
    loaded = loads_safetensors(read_bytes(path), _CACHE_KEY)
    if not loaded.verified:
        raise StateFileError("no checksums (written by an older version or by another program)")
    info = loaded.meta.get("info")
    if not isinstance(info, dict) or info.get("config") != asdict(cfg):
        raise StateFileError("its recorded training config is not this one")
    return loaded.tensors, info


def load_or_train_embedded(cfg: EmbeddedConfig, train: Split, test: Split, cache: Optional[str] = None,
                           log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """The trained embedded model from the cache (checksummed safetensors), training and caching it on first
    use, and again when the cached file is damaged or cannot be verified (training is deterministic).

    Returns (model taking [0, 1] images, info with the cache path, clean test accuracy and training time).
    """
    path = cache_dir(cache) / f"digits_vit_{cfg.key()}.safetensors"
    model = fold_normalization(build_embedded(cfg), EMBEDDED_MEAN, EMBEDDED_STD)
    if path.is_file():
        try:
            state, meta = _read_cached_model(path, cfg)
            model.load_state_dict(state)
            return model.eval(), {"cache": str(path), "trained_now": False, **meta}
        except (OSError, StateFileError, RuntimeError) as err:  # RuntimeError: load_state_dict's mismatches
            log(f"the cached embedded ViT {path} is unusable ({err}); training it again")
    log(f"training the embedded ViT once ({cfg.steps} steps on {len(train)} clean digits); cached at {path}")
    t0 = time.perf_counter()
    bar = _bar(cfg.steps, "train")
    model = train_embedded(cfg, train, progress=lambda s, loss: bar(s, f"loss {loss:.3f}"))
    seconds = time.perf_counter() - t0
    meta = {"clean_test_accuracy": accuracy(model, test), "train_seconds": round(seconds, 1), "config": asdict(cfg)}
    # atomic: concurrent runs never read half a file, a killed run never leaves one
    atomic_write_bytes(path, dumps_safetensors(model.state_dict(), _CACHE_KEY, {"info": meta}))
    # for people; what is read back is the copy inside the model file
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    return model.eval(), {"cache": str(path), "trained_now": True, **meta}


def _bar(total: int, desc: str) -> Callable[[int, str], None]:
    from .progress import Progress

    p = Progress(total, desc)

    def update(step: int, text: str) -> None:
        p.update(1, text)
        if step + 1 >= total:
            p.close()

    return update
