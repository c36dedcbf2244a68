"""The compared methods: the registry's (`tta.registry`), each built fresh on a private copy of the model so
every method sees the same weights."""
import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from torch import nn

from ..tta import ConfigError, registry
from .run_config import DEFAULT_METHODS

#: name -> what it is (the CLI's --method choices).
METHODS = {name: e.description for name, e in registry.REGISTRY.items()}


@dataclass
class MethodOptions:
    """What a run gives its methods: each one's config (absent: the registry's preset) and the run's batch size,
    seed (for the config fields left None), `torch.compile` option and process group."""

    configs: dict[str, Any] = field(default_factory=dict)
    batch_size: Optional[int] = None
    seed: int = 0
    compile: "bool | str | dict" = False
    process_group: Any = None  # torch.distributed group: data-parallel methods (eval.distributed)


def parse_methods(spec) -> list[str]:
    """'all' or a comma-separated list (or a sequence) of registered names, order kept, duplicates dropped;
    `ConfigError` naming an unknown one and the nearest registered name."""
    if spec in (None, "all"):
        return list(DEFAULT_METHODS)
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    if not names:
        raise ConfigError(f"no method given; choose from {', '.join(METHODS)} or all")
    if names == ["all"]:
        return list(DEFAULT_METHODS)
    for m in names:
        registry.entry(m)
    return list(dict.fromkeys(names))


def build_method(name: str, model: nn.Module, opts: MethodOptions, source_batches: Optional[Iterable] = None):
    """A fresh `name` adapter on a deep copy of `model` (`tta.build`). With `source_batches` (clean images) the
    methods that use them get them: EATA its Fisher regulariser, the IMSE variants the code bank's source
    statistics (without them EATA runs unregularised and the bank's source entry has no descriptor)."""
    entry = registry.entry(name)
    group = opts.process_group if getattr(entry.cls, "data_parallel", False) else None
    return registry.build(name, copy.deepcopy(model), opts.configs.get(name), batch_size=opts.batch_size,
                          seed=opts.seed, compile=opts.compile, source=source_batches, process_group=group)
