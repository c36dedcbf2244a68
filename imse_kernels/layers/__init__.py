"""Modules: `FusedSpectralLinear` and whole-model conversion."""
from .conversion import DEFAULT_PATTERNS, spectral_layers, spectralize, unspectralize
from .fused_spectral_linear import FusedSpectralLinear

__all__ = ["FusedSpectralLinear", "spectralize", "unspectralize", "spectral_layers", "DEFAULT_PATTERNS"]
