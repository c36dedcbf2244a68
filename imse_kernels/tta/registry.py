"""The methods by name: name -> (class, config class, preset) (docs/design.md, section 12).

    adapter = build("sar", model, lr=5e-4, batch_size=16)      # fields as keywords, or a config object
    config = make_config("imse-mix", {"lr": "3e-3"})            # a config from text values (files, overrides)
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from torch import nn

from .cotta import CoTTA, CoTTAConfig
from .deyo import DeYO, DeYOConfig
from .eata import EATA, EATAConfig
from .imse import IMSE, IMSEConfig
from .method_config import ConfigError, MethodConfig, nearest
from .sar import SAR, SARConfig
from .source import Source
from .tent import Tent, TentConfig


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its class, its config class (None: no hyper-parameters) and the preset fields."""

    name: str
    cls: type
    config_class: Optional[type]
    description: str
    preset: Mapping[str, Any] = field(default_factory=dict)

    def keys(self) -> list[str]:
        """The hyper-parameters this method takes (its config's fields)."""
        return [] if self.config_class is None else self.config_class.keys()

    def config(self, overrides: Optional[Mapping[str, Any]] = None) -> Optional[MethodConfig]:
        """The preset with `overrides` replaced (text values parsed, keys checked: `MethodConfig.from_mapping`)."""
        overrides = dict(overrides or {})
        if self.config_class is None:
            if overrides:
                raise ConfigError(f"unknown key {self.name + '.' + next(iter(overrides))!r}: "
                                  f"{self.name} has no hyper-parameters")
            return None
        return self.config_class.from_mapping({**self.preset, **overrides}, where=self.name)


REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, cls: type, config_class: Optional[type], description: str, **preset) -> MethodEntry:
    """Add (or replace) a method under `name`; `preset` fields are set before any override."""
    if config_class is not None:
        config_class.check_keys(preset, name)
    REGISTRY[name] = MethodEntry(name, cls, config_class, description, dict(preset))
    return REGISTRY[name]


register("source", Source, None, "the unadapted model")
register("tent", Tent, TentConfig, "Tent: entropy minimisation of LayerNorm affine parameters")
register("sar", SAR, SARConfig, "SAR: sharpness-aware reliable entropy minimisation with model recovery")
register("eata", EATA, EATAConfig, "EATA: filtered, re-weighted entropy minimisation with a Fisher regulariser")
register("cotta", CoTTA, CoTTAConfig, "CoTTA: mean teacher, augmentation-averaged pseudo-labels, stochastic restore")
register("deyo", DeYO, DeYOConfig, "DeYO: entropy and PLPD (patch-shuffle) filtered, re-weighted entropy "
                                   "minimisation")
register("imse", IMSE, IMSEConfig, "IMSE, top-1 code retrieval")
register("imse-mix", IMSE, IMSEConfig, "IMSE, mixture code retrieval (softmax(-KL/T))", retrieval="mix")
register("imse-nodiv", IMSE, IMSEConfig, "IMSE top-1 with diversity weight 0 (entropy only; ablation)",
         diversity_weight=0.0)


def names() -> list[str]:
    """The registered method names, in registration order."""
    return list(REGISTRY)


def entry(name: str) -> MethodEntry:
    """The entry of `name`; `ConfigError` naming the nearest registered name otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}{nearest(str(name), REGISTRY)}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def make_config(name: str, overrides: Optional[Mapping[str, Any]] = None) -> Optional[MethodConfig]:
    """`name`'s config: its preset with `overrides` (text values parsed); None for a method without one."""
    return entry(name).config(overrides)


def build(name: str, model: nn.Module, config: Optional[MethodConfig] = None, *, batch_size: Optional[int] = None,
          seed: Optional[int] = None, compile: "bool | str | dict" = False, source: Optional[Iterable] = None,
          process_group=None, **fields) -> nn.Module:
    """A `name` adapter on `model` (in place: pass a copy to keep the model).

    config          a config of the entry's class (default: the entry's preset); `fields` replace its fields.
    batch_size      the stream's batch size, for the config's learning-rate scaling (where `batch_size` is None).
    seed            the generators' seed (where the config has a `seed` field left None).
    compile         `torch.compile` of the method's forward (`tta.method`); Source has none.
    source          clean source images, given to the methods that use them (`uses_source`: EATA, IMSE).
    process_group   data-parallel adaptation (IMSE); Source needs none.
    """
    e = entry(name)
    if e.config_class is None:
        if config is not None or fields:
            raise ConfigError(f"{name} has no hyper-parameters")
        return e.cls(model)
    if config is None:
        config = e.config()
    elif not isinstance(config, e.config_class):
        raise TypeError(f"build({name!r}): config must be a {e.config_class.__name__}, got {type(config).__name__}")
    if fields:
        e.config_class.check_keywords(fields, f"build({name!r})")
        config = dataclasses.replace(config, **fields)
    follow = {}
    if batch_size is not None and config.batch_size is None:
        follow["batch_size"] = batch_size
    if seed is not None and getattr(config, "seed", 0) is None:
        follow["seed"] = seed
    if follow:
        config = dataclasses.replace(config, **follow)
    kw: dict[str, Any] = {"compile": compile}
    if source is not None and e.cls.uses_source:
        kw["source"] = source
    if process_group is not None:
        kw["process_group"] = process_group
    return e.cls(model, config, **kw)
