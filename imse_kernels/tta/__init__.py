"""Test-time adaptation: IMSE (spectral codes, diversity loss, SAM, code bank) and the Tent/Source baselines.

All adapters are `nn.Module`s wrapping the model (`adapter.model`) with one call: `logits = adapter(x)`
(predict, and adapt where the method does) and `adapter.reset()`, so an evaluation harness can swap them;
`MultiStreamIMSE` runs K independent IMSE streams in one batch: `logits = adapter(x, streams)`.
`state_dict()` / `load_state_dict()` (and `save_state` / `load_state`, safetensors) carry the whole
adaptation state, loadable with `torch.load(weights_only=True)`; see `tta.adapter`.
"""
from .adapter import Adapter, AdapterStateError
from .bank_io import BankFileError
from .code_bank import BankEntry, BankEvent, CodeBank, Retrieval
from .config import IMSEConfig
from .diversity_probe import DiversityProbe
from .domain_stats import DomainStats, DomainTracker, Observation, patch_embedding_tokens, symmetric_kl
from .imse import IMSE
from .multi_stream import MultiStreamIMSE
from .source import Source
from .tent import Tent

__all__ = [
    "IMSE", "MultiStreamIMSE", "IMSEConfig", "Tent", "Source", "Adapter", "AdapterStateError",
    "CodeBank", "BankEntry", "BankEvent", "Retrieval", "BankFileError",
    "DomainStats", "DomainTracker", "Observation", "patch_embedding_tokens", "symmetric_kl",
    "DiversityProbe",
]
