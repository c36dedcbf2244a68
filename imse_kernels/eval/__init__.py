"""Evaluation harness: the registry's methods (`tta.registry`) on streams of corrupted domains (`imse-eval`).

The CLI's stages (docs/design.md, sections 11-13): run_config (check), data_spec and session (set-up), runner
(run), report. Entry point: `imse_kernels.eval.__main__.main`.
"""
from .corruptions import CORRUPTIONS, corrupt
from .streams import SETTINGS, build_stream

__all__ = ["CORRUPTIONS", "corrupt", "SETTINGS", "build_stream"]
