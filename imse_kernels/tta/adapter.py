"""`Adapter`: the `nn.Module` base of every method (docs/design.md, section 6, "Adapters are nn.Modules").

It wraps the model as `model`, is called `logits = adapter(x)` (predict, and adapt where the method does), and
carries the whole adaptation state in `state_dict()` (readable with `weights_only=True`) and `save_state(path)`
(checksummed safetensors); loading checks kind, tensors and config first and raises `AdapterStateError`.
"""
import copy
import os
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..state_file import StateFileError, atomic_write_bytes, dumps_safetensors, loads_safetensors, read_bytes
from .bank_io import BankFileError, _decode, _encode

FORMAT = "imse_kernels.adapter_state"
VERSION = 1
EXTRA_KEY = "_extra_state"  # nn.Module's key for `get_extra_state`
_META_KEY = "imse_adapter_state"


class AdapterStateError(StateFileError):
    """An adapter state (dict or file) is damaged, of another adapter, or does not fit this adapter."""


def differences(found: Mapping, want: Mapping, limit: int = 6) -> list[str]:
    """'key: a in the state, b here' for every key whose values differ (a missing key reads 'absent')."""
    out = []
    for k in list(want) + [k for k in found if k not in want]:
        a, b = found.get(k, "absent"), want.get(k, "absent")
        if a != b:
            out.append(f"{k}: {a!r} in the state, {b!r} here")
    return out[:limit]


def check_optimizer_state(found: Any, optimizer: torch.optim.Optimizer, who: str) -> None:
    """Raise `AdapterStateError` unless `found` is an optimizer state_dict that fits `optimizer`'s parameters."""
    if not isinstance(found, dict) or not isinstance(found.get("param_groups"), list) \
            or not isinstance(found.get("state"), dict):
        raise AdapterStateError(f"{who}: the optimizer state is malformed")
    groups = optimizer.param_groups
    sizes = [len(g.get("params", ())) for g in found["param_groups"]]
    if sizes != [len(g["params"]) for g in groups]:
        raise AdapterStateError(f"{who}: the optimizer state has parameter groups of sizes {sizes}, this "
                                f"optimizer {[len(g['params']) for g in groups]}")
    params = [p for g in groups for p in g["params"]]
    ids = [i for g in found["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    for i, st in found["state"].items():
        if i not in by_id or not isinstance(st, dict):
            raise AdapterStateError(f"{who}: the optimizer state names parameter {i!r}, which no group holds")
        for k, v in st.items():
            if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(by_id[i].shape):
                raise AdapterStateError(f"{who}: optimizer state {k!r} of parameter {i} has shape {list(v.shape)}, "
                                        f"the parameter {list(by_id[i].shape)}")


class Adapter(nn.Module):
    """Base of the adapters: `model` submodule, `forward(x) -> logits`, `reset()`, whole-state save/load.

    Subclasses set `kind` and implement `forward`, `reset`, `_adaptation_state()` (the nested state,
    tensors as references) and `_load_adaptation_state(state)`; `_check_adaptation_state(state)`
    raises on a mismatch without changing anything.
    """

    kind = "Adapter"

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "Adapter":
        """Set the adapter's `training` flag only; the wrapped model keeps the mode its method needs."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    # ------------------------------------------------------------------ state
    def _adaptation_state(self) -> dict:
        return {}

    def _check_adaptation_state(self, state: dict) -> None:
        pass

    def _load_adaptation_state(self, state: dict) -> None:
        pass

    def get_extra_state(self) -> dict:
        """Everything but the model's tensors (copied: later adaptation does not change it)."""
        return {"format": FORMAT, "version": VERSION, "adapter": self.kind,
                **copy.deepcopy(self._adaptation_state())}

    def set_extra_state(self, state: Any) -> None:
        self._check_extra(state)
        self._load_adaptation_state(copy.deepcopy(state))  # the adapter must not share tensors with the caller

    def _check_extra(self, state: Any) -> None:
        self._check_header(state)
        self._check_adaptation_state(state)

    def _check_header(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise AdapterStateError(f"{self.kind}: '{EXTRA_KEY}' is not an imse_kernels adapter state")
        if state.get("version") != VERSION:
            raise AdapterStateError(f"{self.kind}: adapter state version {state.get('version')!r}, this library "
                                    f"reads version {VERSION}")
        if state.get("adapter") != self.kind:
            raise AdapterStateError(f"the state is a {state.get('adapter')!r} adapter's, this is {self.kind}")

    def check_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Raise `AdapterStateError` naming the first mismatches if `state_dict` does not fit; change nothing."""
        if not isinstance(state_dict, Mapping):
            raise AdapterStateError(f"{self.kind}.load_state_dict: expected a mapping, got {type(state_dict).__name__}")
        if EXTRA_KEY in state_dict:
            self._check_header(state_dict[EXTRA_KEY])  # the kind of adapter first, then the model, then the rest
        elif strict:
            raise AdapterStateError(f"{self.kind}.load_state_dict: no '{EXTRA_KEY}' (optimizer, counters, code bank): "
                                    "a plain model state_dict? Load that with adapter.model.load_state_dict")
        own = self.model.state_dict(prefix="model.")
        problems = []
        for k, t in state_dict.items():
            if k == EXTRA_KEY:
                continue
            if k not in own:
                if strict:
                    problems.append(f"{k} is not a tensor of this model")
                continue
            if not isinstance(t, Tensor):
                problems.append(f"{k} is a {type(t).__name__}, not a tensor")
            elif tuple(t.shape) != tuple(own[k].shape) or t.dtype != own[k].dtype:
                problems.append(f"{k} has shape {list(t.shape)} {t.dtype} in the state, "
                                f"{list(own[k].shape)} {own[k].dtype} here")
        if strict:
            problems += [f"{k} is missing from the state" for k in own if k not in state_dict]
        if problems:
            more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
            raise AdapterStateError(f"{self.kind}.load_state_dict: the state comes from a different model: "
                                    + "; ".join(problems[:6]) + more)
        if EXTRA_KEY in state_dict:
            self._check_adaptation_state(state_dict[EXTRA_KEY])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Restore a `state_dict()`: checked first (`check_state_dict`), so a mismatch changes nothing."""
        if assign:
            raise AdapterStateError(f"{self.kind}.load_state_dict: assign=True would replace the parameters "
                                    "the optimizer holds; load in place (assign=False)")
        self.check_state_dict(state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict)

    def save_state(self, path: "os.PathLike | str") -> None:
        """Write `state_dict()` to a safetensors file: model tensors under their keys, the extra state as
        JSON with its tensors by reference, SHA-256 digests; atomic (a failed save keeps the old file)."""
        sd = self.state_dict()
        extra = sd.pop(EXTRA_KEY)
        tensors = {k: v.detach().clone() for k, v in sd.items()}  # clones: no two tensors share memory
        extra_tensors: dict[str, Tensor] = {}
        meta = {"format": FORMAT, "version": VERSION, "adapter": self.kind, "keys": list(tensors),
                "module_versions": _encode(dict(getattr(sd, "_metadata", {})), "meta", extra_tensors),
                "extra": _encode(extra, "extra", extra_tensors)}
        tensors.update(extra_tensors)
        atomic_write_bytes(path, dumps_safetensors(tensors, _META_KEY, meta))

    def load_state(self, path: "os.PathLike | str") -> None:
        """Read a `save_state` file (whole, verified) and `load_state_dict` it; raises `AdapterStateError`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter state file not found: {path}")
        try:
            loaded = loads_safetensors(read_bytes(path), _META_KEY)
        except StateFileError as err:
            raise AdapterStateError(f"{path}: {err}") from err
        meta, tensors = loaded.meta, loaded.tensors
        if meta is None or meta.get("format") != FORMAT:
            raise AdapterStateError(f"{path}: not an adapter state file (no '{_META_KEY}' metadata)")
        if not loaded.verified:
            raise AdapterStateError(f"{path}: adapter state without its metadata digest (damaged file)")
        try:
            sd = OrderedDict((k, tensors[k]) for k in meta["keys"])
            sd._metadata = _decode(meta["module_versions"], tensors)  # what nn.Module.state_dict attaches
            sd[EXTRA_KEY] = _decode(meta["extra"], tensors)
        except (BankFileError, KeyError, TypeError, ValueError) as err:
            raise AdapterStateError(f"{path}: malformed adapter state metadata: {err!r}") from err
        self.load_state_dict(sd)
