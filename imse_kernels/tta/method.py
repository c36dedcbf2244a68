"""`Method`: the template every test-time adaptation method follows (docs/design.md, section 12).

The base owns the config, the effective learning rate, the start snapshot and `reset()`, `episodic` and `steps`,
the counters, the state, `compile=` and clean source data (`prepare`); a method writes its parameter selection
(`_configure`), its optimizer (`_build_optimizer`) and its step (`_step`).
"""
import copy
import dataclasses
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from .adapter import Adapter, AdapterStateError, check_optimizer_state, differences
from .compile_option import compile_fn
from .distributed import GroupComm
from .lr_scaling import scaled_lr
from .method_config import ConfigError, MethodConfig


def resolve_config(config_class: type, config: Optional[MethodConfig], fields: Mapping[str, Any],
                   who: str) -> MethodConfig:
    """`config` (default: `config_class()`) with `fields` replaced; unknown fields raise `ConfigError` naming
    the nearest valid one, a config of another class `TypeError`."""
    if config is None:
        config = config_class()
    elif not isinstance(config, config_class):
        raise TypeError(f"{who}: config must be a {config_class.__name__} (or its fields as keyword arguments), "
                        f"got {type(config).__name__}")
    if fields:
        config_class.check_keywords(fields, who)
        config = dataclasses.replace(config, **fields)
    return config


def source_images(batches: Iterable, who: str) -> Iterator[Tensor]:
    """The image tensors of `batches` (a DataLoader or an iterable of (B, C, H, W) tensors or (images, ...) tuples)."""
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise TypeError(f"{who}: expected image batches (B, C, H, W) or (images, labels) tuples")
        yield x


class Method(Adapter):
    """Base of the adaptation methods (module doc). Subclasses set `kind`, `config_class` and write `_configure`,
    `_build_optimizer` and `_step`; the hooks `_setup`, `_reset_state`, `_reset_counters`, `_method_state`,
    `_check_method_state`, `_load_method_state`, `_prepare` and `_compile_target` are optional."""

    kind = "Method"
    config_class: type = MethodConfig
    uses_source = False
    data_parallel = False
    takes_optimizer = False

    def __init__(self, model: nn.Module, config: Optional[MethodConfig] = None, *, compile: "bool | str | dict" = False,
                 source: Optional[Iterable] = None, **fields) -> None:
        super().__init__()
        # the two options of some methods, which declare them in their own signature (IMSE, Tent)
        process_group, optimizer = fields.pop("process_group", None), fields.pop("optimizer", None)
        self.config = resolve_config(self.config_class, config, fields, self.kind)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.kind}: model must be an nn.Module, got {type(model).__name__}")
        if process_group is not None and not self.data_parallel:
            raise ValueError(f"{self.kind} does not adapt data-parallel (process_group); IMSE does")
        if optimizer is not None and not self.takes_optimizer:
            raise TypeError(f"{self.kind} builds its own optimizer (its config sets it); a ready optimizer= is Tent's")
        self.model = model
        self._comm = None if process_group is None else GroupComm(process_group, self.kind)
        self._given_optimizer = optimizer
        named = self._configure(model)
        if not named:
            raise ValueError(f"{self.kind}: no parameter to adapt")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(True)
        cfg = self.config
        # the effective learning rate of the optimizer the method builds (None: a ready optimizer's own)
        self.lr = None if optimizer is not None else scaled_lr(cfg.lr, cfg.lr_scaling, cfg.batch_size,
                                                               cfg.lr_batch1_factor)
        self.optimizer = optimizer if optimizer is not None else self._build_optimizer(self.params)
        device = self.params[0].device
        self._taken = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._start_params = [p.detach().clone() for p in self.params]
        self._start_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self._setup()
        self._compiled = compile_fn(self._compile_target(), compile, self.kind)
        if source is not None:
            self.prepare(source)

    # ------------------------------------------------------------------ what a method writes
    def _configure(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Set the model's mode, freeze it, and return the (name, parameter) pairs the method trains."""
        raise NotImplementedError

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over `params` at the effective learning rate `self.lr`."""
        raise NotImplementedError

    def _step(self, x: Tensor) -> Tensor:
        """One update on `x`; returns the predictions (detached logits)."""
        raise NotImplementedError

    def _setup(self) -> None:
        """The method's own state, after the parameters and the optimizer exist."""

    def _reset_state(self) -> None:
        """The method's own adaptation state back to its start (moving averages, teachers, generators)."""

    def _reset_counters(self) -> None:
        """The method's own counters to 0."""

    def _prepare(self, batches: Iterable) -> Any:
        raise NotImplementedError

    def _compile_target(self):
        """What `compile=` compiles and `_call` runs: the model's forward unless the method fuses more."""
        return self._model_forward

    def _model_forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ public
    @property
    def skipped_steps(self) -> int:
        """Updates skipped for a non-finite loss or gradient (a device counter: reading it syncs)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped.fill_(int(value))

    @property
    def steps_taken(self) -> int:
        """Updates applied (a device counter: reading it syncs)."""
        return int(self._taken)

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:
        self._taken.fill_(int(value))

    def forward(self, x: Tensor) -> Tensor:
        """Predict `x` (the first step's logits, detached) and adapt."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.kind} adapts with gradients: call it outside torch.inference_mode()")
        if self.config.episodic:
            self._episode_start()
        logits = None
        for _ in range(self.config.steps):
            logits = self._step(x)
        return logits

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the start: trained parameters, optimizer, the method's state and every counter."""
        self._restore_start(optimizer=True)
        self._reset_state()
        self.skipped_steps = self.steps_taken = 0
        self._reset_counters()

    def prepare(self, source: Iterable) -> Any:
        """Use clean source images (a DataLoader or an iterable of (B, C, H, W) tensors or (images, ...)
        tuples): EATA's Fisher regulariser, IMSE's source statistics. Methods that use none refuse them."""
        if not self.uses_source:
            raise TypeError(f"{self.kind} uses no clean source data (prepare / source=); EATA and IMSE do")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.kind}.prepare: call it outside torch.inference_mode()")
        return self._prepare(source)

    # ------------------------------------------------------------------ shared pieces of the steps
    def _call(self, *args):
        """The compile target on `args`: compiled when `compile=` asked (batch dimension dynamic), else eager."""
        if self._compiled is None:
            return self._compile_target()(*args)
        for a in args:
            if isinstance(a, Tensor):
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return self._compiled(*args)

    def _count(self, ok) -> None:
        """Count a step as taken where `ok` (a bool or a 0-dim bool tensor), else as skipped."""
        if isinstance(ok, Tensor):
            self._taken += ok
            self._skipped += ~ok
        else:
            self._taken += int(ok)
            self._skipped += int(not ok)

    def _update(self, loss: Tensor) -> bool:
        """Backward `loss` and step the optimizer, unless the loss or a gradient is not finite (then the step is
        skipped and counted); one host sync. Returns whether it stepped."""
        loss.backward()
        norms = [p.grad.norm() for p in self.params if p.grad is not None]
        health = loss.detach() + (torch.stack(norms).sum() if norms else 0.0)  # NaN/inf anywhere shows here
        ok = bool(torch.isfinite(health))
        if ok:
            self.optimizer.step()
        self._count(ok)
        self.optimizer.zero_grad(set_to_none=True)
        return ok

    @torch.no_grad()
    def _restore_start(self, optimizer: bool) -> None:
        """Trained parameters (and, if `optimizer`, the optimizer state) back to the start snapshot."""
        for p, p0 in zip(self.params, self._start_params):
            p.copy_(p0)
        if optimizer:
            self.optimizer.load_state_dict(copy.deepcopy(self._start_optimizer))

    def _episode_start(self) -> None:
        """Before each batch of an episodic method: the start state again; the counters go on."""
        self._restore_start(optimizer=True)
        self._reset_state()

    # ------------------------------------------------------------------ state (tta.adapter)
    def _counters(self) -> dict:
        return {"steps_taken": self.steps_taken, "skipped_steps": self.skipped_steps}

    def _method_state(self) -> dict:
        """The method's own state and counters (plain values and tensors), under the key `kind.lower()`."""
        return {}

    def _check_method_state(self, own: Any) -> None:
        """Raise `AdapterStateError` unless `own` fits this method; change nothing."""

    def _load_method_state(self, own: dict) -> None:
        pass

    def _adaptation_state(self) -> dict:
        """config, trained parameters, optimizer class, counters, optimizer state, the start snapshot and the
        method's own state."""
        return {"config": dataclasses.asdict(self.config), "params": list(self.param_names),
                "optimizer_class": type(self.optimizer).__name__, "counters": self._counters(),
                "optimizer": self.optimizer.state_dict(), "start_params": list(self._start_params),
                "start_optimizer": self._start_optimizer, self.kind.lower(): self._method_state()}

    def _check_config_state(self, found: Any) -> None:
        if not isinstance(found, dict):
            raise AdapterStateError(f"{self.kind}: the state's config is malformed: {found!r}")
        found, want = self.config_class.with_defaults(found), dataclasses.asdict(self.config)
        if found != want:
            raise AdapterStateError(f"{self.kind}: the state was saved with another config: "
                                    f"{'; '.join(differences(found, want))}")

    def _check_counters(self, counters: Any) -> None:
        if not isinstance(counters, dict) or not all(isinstance(counters.get(k), int)
                                                     for k in ("steps_taken", "skipped_steps")):
            raise AdapterStateError(f"{self.kind}: malformed counters in the state: {counters!r}")

    def _check_adaptation_state(self, state: dict) -> None:
        try:
            self._check_config_state(state["config"])
            if list(state["params"]) != self.param_names:
                diff = sorted(set(state["params"]) ^ set(self.param_names))[:6]
                raise AdapterStateError(f"{self.kind}: the state trains other parameters (differences: {diff})")
            if state["optimizer_class"] != type(self.optimizer).__name__:
                raise AdapterStateError(f"{self.kind}: the state's optimizer is a {state['optimizer_class']}, "
                                        f"this adapter's a {type(self.optimizer).__name__}")
            self._check_counters(state["counters"])
            starts = state["start_params"]
            if [tuple(t.shape) if isinstance(t, Tensor) else None for t in starts] != \
                    [tuple(p.shape) for p in self.params]:
                raise AdapterStateError(f"{self.kind}: the state's start values do not match the trained "
                                        "parameters' shapes")
            check_optimizer_state(state["optimizer"], self.optimizer, self.kind)
            check_optimizer_state(state["start_optimizer"], self.optimizer, f"{self.kind} (start)")
            self._check_method_state(state[self.kind.lower()])
        except KeyError as err:
            raise AdapterStateError(f"{self.kind}: the adapter state lacks {err}") from err

    def _load_adaptation_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._start_params = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(state["start_params"], self.params)]
        self._start_optimizer = state["start_optimizer"]
        self.steps_taken = state["counters"]["steps_taken"]
        self.skipped_steps = state["counters"]["skipped_steps"]
        self._load_method_state(state[self.kind.lower()])


__all__ = ["Method", "ConfigError", "resolve_config", "source_images"]
