"""What `imse-eval` runs, from defaults, a config file and overrides: the check stage (docs/design.md, section 12).

Sections `run` (`RunConfig`) and one per registry name, resolved in layers: defaults < `--config FILE.yaml` or a
results.json < the command line's options < `--set KEY=VALUE` and trailing `KEY VALUE` pairs. The resolved config
goes into every results.json, so `--config results.json` repeats the run.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..tta import IMSE, ConfigError, registry
from ..tta.method_config import CheckedConfig, nearest
from .checks import APPLIES_TO, check_data_dir, check_max_per_domain, check_options_apply
from .corruptions import CORRUPTIONS, parse_corruptions
from .data_spec import DATA_SOURCES
from .imagenet_c import SUBSETS
from .images import SCAN_MODES
from .preprocess import DEFAULT_PREPROCESS, PREPROCESS
from .protocol import DEFAULT_REPORTS, REPORTS
from .streams import DEFAULT_DIRICHLET, SETTINGS
from .usage import UsageError

RUN = "run"
#: What `--method all` runs; the IMSE ablations ("imse-mix", "imse-nodiv") are selected by name.
DEFAULT_METHODS = ("source", "tent", "sar", "eata", "cotta", "deyo", "imse")
#: The official IMSE recurring setting's learning rate (bash/3_imse_recurring.sh: OPTIM.LR 3e-3).
RECURRING_IMSE_LR = 3e-3
AMP = ("bf16", "fp16")


@dataclass
class RunConfig(CheckedConfig):
    """The `run` section: data, model, stream, methods and how they run. Every field is also an `imse-eval`
    option (`--batch-size` is `batch_size`); `imse-eval --help` explains each."""

    label = "run"

    data: Optional[str] = None             # None: digits (an error with data_dir: checks.check_data_dir)
    data_dir: Optional[str] = None
    source_dir: Optional[str] = None
    corruptions: tuple[str, ...] = CORRUPTIONS  # ("all",): digits the 15; a folder's: every one present
    severity: int = 5
    n_test: Optional[int] = None           # digits: test images per domain (None: 512)
    max_per_domain: Optional[int] = None
    subset: Optional[str] = None           # imagenet-c: 5000 (None) or full
    preprocess: Optional[str] = None       # imagenet-c: a preprocess.PREPROCESS name (None: res256crop224)
    label_map: Optional[str] = None        # imagenet-c: folder -> class index file
    image_check: Optional[str] = None      # imagenet-c: images.SCAN_MODES (None: header)
    skip_unreadable: bool = False          # imagenet-c: leave unreadable images out of every domain
    report: Optional[str] = None           # error or accuracy (None: what the data set's papers report)
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    train_steps: Optional[int] = None
    setting: str = "continual"
    dirichlet: float = DEFAULT_DIRICHLET
    rounds: int = 3
    streams: int = 4
    methods: tuple[str, ...] = DEFAULT_METHODS
    batch_size: int = 64
    seeds: tuple[int, ...] = (0,)
    amp: Optional[str] = None
    backend: Optional[str] = None
    device: str = "auto"
    threads: Optional[int] = None
    compile: bool = False

    def check(self) -> None:
        need = self.need
        if self.data is not None:
            self.need_choice("data", DATA_SOURCES)
        if self.data in (None, "digits"):  # a folder data set's missing --data-dir: the check stage (DataSpec)
            self.data = check_data_dir(self.data, self.data_dir)
        self._check_data_options()
        need(1 <= self.severity <= 5, f"--severity must be 1..5, got {self.severity}")
        need(self.setting in SETTINGS + ("multi_stream",),
             f"--setting must be one of {', '.join(SETTINGS + ('multi_stream',))}, got {self.setting!r}")
        need(self.dirichlet > 0, f"--dirichlet must be > 0, got {self.dirichlet}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("rounds", "streams"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("n_test", "num_classes", "img_size", "patch_size", "train_steps", "threads"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
        self.methods = DEFAULT_METHODS if self.methods in ((), ("all",)) else tuple(dict.fromkeys(self.methods))
        for m in self.methods:
            registry.entry(m)  # ConfigError naming the nearest method
        need(len(self.seeds) > 0, "--seeds takes comma-separated integers, got none")
        self.seeds = tuple(dict.fromkeys(self.seeds))
        need(self.setting != "multi_stream" or len(self.seeds) == 1,
             "--seeds applies to the single-stream settings; run multi_stream once per --seed")
        need(self.amp is None or self.amp in AMP, f"--amp must be one of {AMP}, got {self.amp!r}")

    def _typed(self, name: str, value, hint):
        if name == "subset" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `subset: 5000` in a YAML file
        return super()._typed(name, value, hint)

    def _check_data_options(self) -> None:
        """The options that apply to the data set (checks.APPLIES_TO), its corruptions, and its defaults filled
        in (so a results file records the protocol that ran)."""
        need = self.need
        check_options_apply(self.data, {k: getattr(self, k) for k in APPLIES_TO})
        check_max_per_domain(self.max_per_domain)
        names = tuple(dict.fromkeys(self.corruptions))
        need(len(names) > 0, "--corruptions needs at least one name (or all)")
        need(names == ("all",) or "all" not in names, f"--corruptions is 'all' or a list of names, got {names}")
        if self.data == "digits":  # the 15 made here; a folder's names are checked against what it holds
            try:
                names = tuple(parse_corruptions("all" if names == ("all",) else names))
            except ValueError as err:
                need(False, str(err))
            self.n_test = 512 if self.n_test is None else self.n_test
        self.corruptions = names
        if self.data == "imagenet-c":
            self.subset = self.subset or "5000"
            self.preprocess = self.preprocess or DEFAULT_PREPROCESS[self.data]
            self.image_check = self.image_check or "header"
            self.need_choice("subset", SUBSETS)
            self.need_choice("preprocess", PREPROCESS)
            self.need_choice("image_check", SCAN_MODES)
        self.report = self.report or DEFAULT_REPORTS[self.data]
        self.need_choice("report", REPORTS)

    @property
    def severities(self) -> list[int]:
        """1..severity in the gradual setting, else [severity]."""
        return list(range(1, self.severity + 1)) if self.setting == "gradual" else [self.severity]


@dataclass
class ResolvedConfig:
    """The run and each method's config (None for Source), everything resolved."""

    run: RunConfig
    methods: dict[str, Any]

    def record(self) -> dict:
        """The config file of this run: `run` and one section per method, every field written out."""
        return {RUN: self.run.to_dict(), **{n: ({} if c is None else c.to_dict()) for n, c in self.methods.items()}}


def sections() -> list[str]:
    return [RUN] + registry.names()


def split_key(key: str) -> tuple[str, str]:
    """'sar.lr' -> ('sar', 'lr'); the section is checked against the run and the registered methods."""
    section, dot, name = str(key).partition(".")
    if not dot or not name:
        raise ConfigError(f"a key is <section>.<field>, e.g. sar.lr or run.batch_size; got {key!r}")
    check_section(section)
    return section, name


def check_section(section: str) -> None:
    if section not in sections():
        raise ConfigError(f"unknown section {section!r}{nearest(str(section), sections())}; the sections are "
                          f"{', '.join(sections())}")


def load_config_file(path: "str | Path") -> dict[str, dict]:
    """The sections of a YAML config file (read with `yaml.safe_load`), or of a JSON file; a results.json gives
    the config it recorded. Raises `UsageError` for a missing or malformed file, `ConfigError` for an unknown
    section."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml's and json's parse errors have no common base
        raise UsageError(f"{path}: not a readable config file: {err}") from err
    if isinstance(data, dict) and "config" in data and "meta" in data:  # a results.json
        data = data["config"]
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, (dict, type(None))) for v in data.values()):
        raise UsageError(f"{path}: a config file maps sections (run, and method names) to mappings of keys")
    out = {}
    for section, values in data.items():
        check_section(section)
        out[section] = dict(values or {})
    return out


def parse_assignment(text: str) -> tuple[str, str, str]:
    """'sar.lr=5e-4' -> ('sar', 'lr', '5e-4')."""
    key, eq, value = str(text).partition("=")
    if not eq:
        raise ConfigError(f"--set takes KEY=VALUE (e.g. --set sar.lr=5e-4), got {text!r}")
    return (*split_key(key.strip()), value.strip())


def parse_pairs(tokens: Sequence[str]) -> list[tuple[str, str, str]]:
    """Trailing yacs-style overrides ['sar.lr', '5e-4', 'run.batch_size', '32'] -> [(section, key, value), ...]."""
    if len(tokens) % 2:
        raise ConfigError(f"overrides come as KEY VALUE pairs; {tokens[-1]!r} has no value")
    return [(*split_key(k), v) for k, v in zip(tokens[0::2], tokens[1::2])]


def layer(assignments: Iterable[tuple[str, str, Any]]) -> dict[str, dict]:
    """Assignments as sections: [('sar', 'lr', '5e-4')] -> {'sar': {'lr': '5e-4'}}."""
    out: dict[str, dict] = {}
    for section, key, value in assignments:
        out.setdefault(section, {})[key] = value
    return out


def resolve(layers: Sequence[Mapping[str, Mapping[str, Any]]]) -> ResolvedConfig:
    """The run and method configs from `layers` of sections, later layers replacing earlier ones (module doc).
    Every method section is checked, also one of a method this run does not select."""
    merged: dict[str, dict] = {}
    for lay in layers:
        for section, values in lay.items():
            check_section(section)
            merged.setdefault(section, {}).update(values)
    run = RunConfig.from_mapping(merged.pop(RUN, {}), where=RUN)
    if run.setting == "recurring":
        for name, e in registry.REGISTRY.items():
            if e.cls is IMSE:
                merged.setdefault(name, {}).setdefault("lr", RECURRING_IMSE_LR)
    configs = {name: registry.make_config(name, values) for name, values in merged.items()}
    selected = ("imse",) if run.setting == "multi_stream" else run.methods  # multi_stream: MultiStreamIMSE vs IMSE
    return ResolvedConfig(run, {name: configs[name] if name in configs else registry.make_config(name)
                                for name in selected})


@dataclass(frozen=True)
class Invocation:
    """How this invocation runs, not what it computes (so not part of the config files): where the results go,
    progress bars and plot, the embedded model's cache, DataLoader workers, the torchrun timeout."""

    output_dir: str = "imse_eval_out"
    progress: bool = True
    plot: bool = True
    cache_dir: Optional[str] = None
    workers: int = 0
    dist_timeout: float = 120.0
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The checked request: the resolved config, the data to load and the invocation's options."""

    config: ResolvedConfig
    data: Any  # eval.data_spec.DataSpec
    invocation: Invocation

    @property
    def run(self) -> RunConfig:
        return self.config.run
