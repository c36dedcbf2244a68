"""`MethodConfig`: the base of every method's config dataclass (docs/design.md, section 12).

What every config repeats is written here once (`CheckedConfig`): the type of each field (from its
annotation), the common range checks (`need_*`), values given as text (a YAML file, `--set sar.lr=5e-4`),
and unknown keys, which raise `ConfigError` naming the key and the nearest valid one. A subclass declares
its fields with defaults and writes its own rules in `check()`. `MethodConfig` adds the learning rate's
batch scaling that every method's config carries (`tta.lr_scaling`).
"""
import collections.abc
import dataclasses
import difflib
import typing
from typing import Any, Iterable, Mapping, Optional

from .lr_scaling import LR_SCALING


class ConfigError(ValueError):
    """A method name, config key or config value is not valid; the message names it and how to fix it."""


def nearest(key: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the valid key closest to `key`, or '' when none is close."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_NONE_TEXT = ("none", "null", "~")
_BOOL_TEXT = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _optional(hint) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None)."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return False, hint


def _is_sequence_hint(hint) -> bool:
    return typing.get_origin(hint) in (tuple, list, collections.abc.Sequence)


@dataclasses.dataclass
class CheckedConfig:
    """A dataclass whose construction checks every field's type and the subclass's `check()`; a failed check
    raises `ConfigError` ("<label>: <field> must be ..., got ..."; the label is the class name by default)."""

    label = ""  # class attribute: the name errors start with (default: the class name)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, self._typed(f.name, getattr(self, f.name), hints[f.name]))
        self._check_common()
        self.check()

    # ------------------------------------------------------------------ rules
    def _check_common(self) -> None:
        """The rules of the fields a base class declares (before the subclass's `check()`)."""

    def check(self) -> None:
        """The subclass's range and cross-field rules (with `need` and the `need_*` helpers)."""

    def need(self, ok: bool, msg: str) -> None:
        """Raise `ConfigError` "<Class>: msg" unless `ok`."""
        if not ok:
            raise ConfigError(f"{self.label or type(self).__name__}: {msg}")

    def need_positive(self, *names: str) -> None:
        for n in names:
            self.need(getattr(self, n) > 0, f"{n} must be > 0, got {getattr(self, n)}")

    def need_non_negative(self, *names: str) -> None:
        for n in names:
            self.need(getattr(self, n) >= 0, f"{n} must be >= 0, got {getattr(self, n)}")

    def need_fraction(self, *names: str) -> None:
        """Each value in [0, 1) (a momentum, an EMA factor)."""
        for n in names:
            self.need(0 <= getattr(self, n) < 1, f"{n} must be in [0, 1), got {getattr(self, n)}")

    def need_at_least(self, name: str, low: int) -> None:
        v = getattr(self, name)
        self.need(v is None or v >= low, f"{name} must be an int >= {low}, got {v}")

    def need_choice(self, name: str, choices: tuple) -> None:
        v = getattr(self, name)
        self.need(v in choices, f"{name} must be one of {choices}, got {v!r}")

    # ------------------------------------------------------------------ types
    def _typed(self, name: str, value, hint):
        """`value` as the field's type (ints widen to float, sequences become tuples); ConfigError otherwise."""
        nullable, hint = _optional(hint)
        if value is None:
            self.need(nullable, f"{name} must not be None")
            return None
        if hint is float:
            self.need(isinstance(value, (int, float)) and not isinstance(value, bool),
                      f"{name} must be a number, got {value!r}")
            return float(value)
        if hint is int:
            self.need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an int, got {value!r}")
            return value
        if hint is bool:
            self.need(isinstance(value, bool), f"{name} must be a bool, got {value!r}")
            return value
        if hint is str:
            self.need(isinstance(value, str), f"{name} must be a string, got {value!r}")
            return value
        if _is_sequence_hint(hint):
            self.need(isinstance(value, (list, tuple)), f"{name} must be a sequence, got {value!r}")
            args = [a for a in typing.get_args(hint) if a is not Ellipsis]
            item = args[0] if args else None
            out = []
            for v in value:
                if item is float:
                    self.need(isinstance(v, (int, float)) and not isinstance(v, bool),
                              f"{name} must hold numbers, got {value!r}")
                    v = float(v)
                elif item is int:
                    self.need(isinstance(v, int) and not isinstance(v, bool), f"{name} must hold ints, got {value!r}")
                out.append(v)
            return tuple(out)
        return value

    @classmethod
    def parse(cls, name: str, value):
        """`value` for field `name`, read leniently as text where it is a string (a YAML file or a command-line
        override: '5e-4', 'true', 'none', '[0.9, 0.999]' or '0.9,0.999'); other values pass unchanged to the
        constructor's checks."""
        nullable, hint = _optional(typing.get_type_hints(cls)[name])
        if _is_sequence_hint(hint) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return (value,)  # `seeds: 0` in a file: one value
        if not isinstance(value, str):
            return value
        text = value.strip()
        if nullable and text.lower() in _NONE_TEXT:
            return None
        try:
            if hint is float:
                return float(text)
            if hint is int:
                return int(text)
            if hint is bool:
                return _BOOL_TEXT[text.lower()]
            if _is_sequence_hint(hint):
                item = [a for a in typing.get_args(hint) if a is not Ellipsis]
                conv = item[0] if item and item[0] in (int, float) else str
                parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
                return tuple(conv(p) for p in parts)
        except (KeyError, ValueError):
            raise ConfigError(f"{cls.label or cls.__name__}: {name} cannot be read from {value!r} "
                              f"(expected {getattr(hint, '__name__', hint)})") from None
        return value

    # ------------------------------------------------------------------ keys and records
    @classmethod
    def keys(cls) -> list[str]:
        """The field names: the keys of this config in files and overrides."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, keys: Iterable[str], where: str = "") -> None:
        """Raise `ConfigError` naming the first unknown key and the nearest valid one."""
        valid = cls.keys()
        for k in keys:
            if k not in valid:
                key, prefix = str(k), f"{where}." if where else ""
                hint = nearest(prefix + key, [prefix + v for v in valid])
                raise ConfigError(f"unknown key {prefix + key!r}{hint}; {where or cls.__name__} has {', '.join(valid)}")

    @classmethod
    def check_keywords(cls, keys: Iterable[str], who: str) -> None:
        """Raise `TypeError` (as Python does for an unexpected keyword) naming the first keyword that is not a
        field and the nearest field."""
        valid = cls.keys()
        for k in keys:
            if k not in valid:
                raise TypeError(f"{who}() got an unexpected keyword argument {k!r}{nearest(str(k), valid)}; "
                                f"the {cls.__name__} fields are {', '.join(valid)}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Optional["MethodConfig"] = None,
                     where: str = "") -> "MethodConfig":
        """`base` (default: the defaults) with `values` replaced; text values are parsed (`parse`); unknown keys
        raise `ConfigError` naming the key (prefixed by `where`) and the nearest valid one."""
        cls.check_keys(values, where)
        parsed = {k: cls.parse(k, v) for k, v in values.items()}
        return cls(**parsed) if base is None else dataclasses.replace(base, **parsed)

    def to_dict(self) -> dict:
        """Every field, JSON-ready (tuples as lists): what results files record and config files hold."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def with_defaults(cls, found: Mapping) -> dict:
        """A config dict saved by an older version, completed with the defaults of the fields added since, so
        it compares equal to `dataclasses.asdict` of a config built with those defaults."""
        out = dict(found)
        for f in dataclasses.fields(cls):
            if f.name not in out and f.default is not dataclasses.MISSING:
                out[f.name] = f.default
        return out


@dataclasses.dataclass
class MethodConfig(CheckedConfig):
    """Base of the methods' configs: the fields every method has, checked here once. A config redeclares a field
    to change its default (the field keeps its place).

    lr                 the learning rate at the reference batch of 64.
    steps, episodic    updates per batch; restore the start state before every batch.
    lr_scaling, lr_batch1_factor, batch_size   the learning rate's batch scaling (`tta.lr_scaling`): the rule,
                       the factor at batch 1, the stream's batch size (None: lr as given; imse-eval and
                       `tta.build` fill in the run's).
    """

    lr: float = 1e-3
    steps: int = 1
    episodic: bool = False
    lr_scaling: str = "none"
    lr_batch1_factor: float = 1.0
    batch_size: Optional[int] = None

    def _check_common(self) -> None:
        self.need_positive("lr", "lr_batch1_factor")
        self.need_at_least("steps", 1)
        self.need_choice("lr_scaling", LR_SCALING)
        self.need_at_least("batch_size", 1)
