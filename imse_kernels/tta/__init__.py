"""Test-time adaptation: IMSE and the baselines Source, Tent, SAR, EATA, CoTTA and DeYO, one template for all.

Every method is `Method(model, config=None, *, compile=False, source=None, **fields)`, an `nn.Module` called
`logits = adapter(x)`; `build(name, model, ...)` makes one by name; `MultiStreamIMSE` adapts K streams in one
batch. docs/design.md, sections 6-9, 11 and 12.
"""
from .adapter import Adapter, AdapterStateError
from .bank_io import BankFileError
from .code_bank import BankEntry, BankEvent, CodeBank, Retrieval
from .config import IMSEConfig
from .cotta import CoTTA, CoTTAConfig
from .deyo import DeYO, DeYOConfig
from .diversity_probe import DiversityProbe
from .domain_stats import DomainStats, DomainTracker, Observation, patch_embedding_tokens, symmetric_kl
from .eata import EATA, EATAConfig
from .imse import IMSE
from .lr_scaling import LR_SCALING, scaled_lr
from .method import Method
from .method_config import ConfigError, MethodConfig
from .multi_stream import MultiStreamIMSE
from .registry import REGISTRY, MethodEntry, build, make_config, names, register
from .sar import SAR, SARConfig
from .source import Source
from .tent import Tent, TentConfig

__all__ = [
    "IMSE", "MultiStreamIMSE", "IMSEConfig", "Tent", "TentConfig", "Source", "Adapter", "AdapterStateError",
    "SAR", "SARConfig", "EATA", "EATAConfig", "CoTTA", "CoTTAConfig", "DeYO", "DeYOConfig",
    "Method", "MethodConfig", "ConfigError", "LR_SCALING", "scaled_lr",
    "REGISTRY", "MethodEntry", "build", "make_config", "names", "register",
    "CodeBank", "BankEntry", "BankEvent", "Retrieval", "BankFileError",
    "DomainStats", "DomainTracker", "Observation", "patch_embedding_tokens", "symmetric_kl",
    "DiversityProbe",
]
