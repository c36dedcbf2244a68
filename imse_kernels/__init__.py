"""imse_kernels: fused spectral linear layers (train only the singular values) and IMSE test-time adaptation."""
from . import _extension, losses, optim, tta  # noqa: E402  (IMSE on top of the layers)
from .backends import available_backends, backend_status, use_backend
from .layers import FusedSpectralLinear, spectral_layers, spectralize, stream_codes, unspectralize
from .ops import spectral_linear
from .tta import IMSE, IMSEConfig, MultiStreamIMSE, Source, Tent

__version__ = "0.1.0"

_extension.load("_C")  # registers the C++ CPU ops; warns once and falls back if missing

__all__ = [
    "spectral_linear", "FusedSpectralLinear", "spectralize", "unspectralize", "spectral_layers", "stream_codes",
    "available_backends", "backend_status", "use_backend", "__version__",
    "IMSE", "IMSEConfig", "MultiStreamIMSE", "Tent", "Source", "losses", "optim", "tta",
]
