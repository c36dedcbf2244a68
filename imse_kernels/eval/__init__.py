"""Evaluation harness: the registry's methods (`tta.registry`) on streams of corrupted domains (`imse-eval`).

Modules: digits (embedded data), corruptions (the 15 ImageNet-C types in torch), imagenet_c (folder loader),
models (embedded ViT cache, timm checkpoints, normalisation folding), streams (settings); the CLI's stages
(docs/design.md, section 12): run_config (check: config files, overrides, `RunConfig`), data_spec (data sources),
session (set-up), runner (run), report; methods, metrics, provenance, cache, progress, usage (`UsageError`).
Entry point: `imse_kernels.eval.__main__.main`.
"""
from .corruptions import CORRUPTIONS, corrupt
from .streams import SETTINGS, build_stream

__all__ = ["CORRUPTIONS", "corrupt", "SETTINGS", "build_stream"]
