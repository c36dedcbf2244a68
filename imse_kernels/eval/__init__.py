"""Evaluation harness: Source vs Tent vs IMSE on streams of corrupted domains (`imse-eval`).

Modules: digits (embedded data), corruptions (the 15 ImageNet-C types in torch), imagenet_c (folder loader),
models (embedded ViT cache, timm checkpoints, normalisation folding), streams (settings), methods, runner,
metrics, report, cache, progress. Entry point: `imse_kernels.eval.__main__.main`.
"""
from .corruptions import CORRUPTIONS, corrupt
from .streams import SETTINGS, build_stream

__all__ = ["CORRUPTIONS", "corrupt", "SETTINGS", "build_stream"]
