"""Modules: `FusedSpectralLinear`, whole-model conversion, and per-stream code selection."""
from .conversion import DECODER_PRESETS, DEFAULT_PATTERNS, preset_patterns, spectral_layers, spectralize, unspectralize
from .fused_spectral_linear import FusedSpectralLinear
from .stream_codes import coded_layers, stream_codes

__all__ = ["FusedSpectralLinear", "spectralize", "unspectralize", "spectral_layers", "DEFAULT_PATTERNS",
           "DECODER_PRESETS", "preset_patterns",
           "stream_codes", "coded_layers"]
