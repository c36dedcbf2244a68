"""Test-time adaptation: IMSE (spectral codes, diversity loss, SAM, code bank) and the baselines: Source, Tent,
SAR, EATA, CoTTA and DeYO, whose configs default to their authors' ImageNet-C settings (ViT-B/16, batch 64,
where the authors give one; CoTTA's are its ImageNet-C ones). The baselines' thresholds are fractions of ln C.

Every method follows one template (`tta.method`, docs/design.md section 12): `Method(model, config=None, *,
compile=False, source=None, **fields)`, an `nn.Module` wrapping the model (`adapter.model`) with one call,
`logits = adapter(x)` (predict, and adapt where the method does), and `adapter.reset()`, so an evaluation
harness can swap them. `build(name, model, ...)` makes one by name (`tta.registry`).
`MultiStreamIMSE` runs K independent IMSE streams in one batch: `logits = adapter(x, streams)`.
`state_dict()` / `load_state_dict()` (and `save_state` / `load_state`, safetensors) carry the whole
adaptation state, loadable with `torch.load(weights_only=True)`; see `tta.adapter`.
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
