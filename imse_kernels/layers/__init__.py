"""Modules: `FusedSpectralLinear`, whole-model conversion, and per-stream code selection."""
from .conversion import DEFAULT_PATTERNS, spectral_layers, spectralize, unspectralize
from .fused_spectral_linear import FusedSpectralLinear
from .stream_codes import coded_layers, stream_codes

__all__ = ["FusedSpectralLinear", "spectralize", "unspectralize", "spectral_layers", "DEFAULT_PATTERNS",
           "stream_codes", "coded_layers"]
