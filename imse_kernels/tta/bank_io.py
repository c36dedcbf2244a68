"""Code bank files: safetensors tensors plus checksummed JSON metadata; nothing is unpickled on load.

Written atomically and read whole (`imse_kernels.state_file`); every problem raises `BankFileError`; a version-1
file (no digests) still loads, with a warning. The layout: docs/design.md, section 7, "File format".
"""
import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor

from ..state_file import StateFileError, atomic_write_bytes, dumps_safetensors, loads_safetensors, read_bytes

FORMAT = "imse_kernels.code_bank"
VERSION = 2
_READS = (1, 2)
_META_KEY = "imse_code_bank"


class BankFileError(StateFileError):
    """A code bank file is unreadable, corrupted, truncated or does not fit the model."""


# ---------------------------------------------------------------- optimizer state ↔ JSON + tensors

def _encode(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().contiguous().clone()
        return {"t": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"code bank: optimizer state key {k!r} is neither str nor int")
        return {"d": [[k, _encode(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [_encode(v, prefix, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, str)):
        return {"v": obj}
    if isinstance(obj, float):
        return {"f": repr(obj)}  # repr keeps inf/nan and every bit
    raise TypeError(f"code bank: cannot store optimizer-state value of type {type(obj).__name__}")


def _decode(node: Any, tensors: dict[str, Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise BankFileError(f"malformed optimizer-state node {node!r}")
    (tag, val), = node.items()
    if tag == "t":
        if val not in tensors:
            raise BankFileError(f"optimizer state refers to missing tensor {val!r}")
        return tensors[val]
    if tag == "d":
        return {k: _decode(v, tensors) for k, v in val}
    if tag in ("l", "u"):
        items = [_decode(v, tensors) for v in val]
        return items if tag == "l" else tuple(items)
    if tag == "v":
        return val
    if tag == "f":
        return float(val)
    raise BankFileError(f"unknown optimizer-state tag {tag!r}")


# ---------------------------------------------------------------- files

def write_bank_file(path: "os.PathLike | str", entries: list[dict], next_id: int) -> None:
    """entries: dicts with id, created_at, weight, mean, var (Tensor or None), codes, optimizer_state.

    Written atomically: a failed or killed save leaves the previous file as it was."""
    tensors: dict[str, Tensor] = {}
    meta_entries = []
    for i, e in enumerate(entries):
        p = f"e{i}"
        has_stats = e["mean"] is not None
        if has_stats:
            tensors[f"{p}.mean"] = e["mean"].detach().cpu().contiguous()
            tensors[f"{p}.var"] = e["var"].detach().cpu().contiguous()
        for name, s in e["codes"].items():
            tensors[f"{p}.s.{name}"] = s.detach().cpu().contiguous().clone()
        opt = None if e["optimizer_state"] is None else _encode(e["optimizer_state"], f"{p}.opt", tensors)
        meta_entries.append({"id": int(e["id"]), "created_at": int(e["created_at"]), "weight": float(e["weight"]),
                             "has_stats": has_stats, "layers": list(e["codes"]), "optimizer": opt})
    meta = {"format": FORMAT, "version": VERSION, "next_id": int(next_id), "entries": meta_entries}
    atomic_write_bytes(path, dumps_safetensors(tensors, _META_KEY, meta))


def read_bank_file(path: "os.PathLike | str") -> tuple[list[dict], int]:
    """The entries (as written) and next_id; raises `BankFileError` on any inconsistency.

    The file is read whole, so the returned tensors do not refer to it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"code bank file not found: {path}")
    try:
        loaded = loads_safetensors(read_bytes(path), _META_KEY)
    except OSError as err:
        raise BankFileError(f"{path}: cannot read the code bank file: {err}") from err
    except StateFileError as err:
        raise BankFileError(f"{path}: {err}") from err
    tensors, meta = loaded.tensors, loaded.meta
    if meta is None:
        raise BankFileError(f"{path} is a safetensors file but not a code bank (no '{_META_KEY}' metadata)")
    if meta.get("format") != FORMAT:
        raise BankFileError(f"{path}: not a code bank (format {meta.get('format')!r})")
    version = meta.get("version")
    if isinstance(version, bool) or version not in _READS:
        raise BankFileError(f"{path}: code bank version {version!r}, this library reads versions "
                            f"{', '.join(map(str, _READS))}")
    if not loaded.verified:
        if version >= 2:
            raise BankFileError(f"{path}: version-{version} code bank without its metadata digest "
                                f"'{_META_KEY}.sha256' (damaged file)")
        warnings.warn(f"{path}: version-1 code bank without checksums, loaded unverified; re-save it "
                      "(CodeBank.load then CodeBank.save, or IMSE.load_bank then IMSE.save_bank) to upgrade it "
                      f"to version {VERSION} with SHA-256 digests", UserWarning, stacklevel=2)
    try:
        entries, next_id = _parse_entries(meta, tensors, path)
    except BankFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as err:
        raise BankFileError(f"{path}: malformed code bank metadata: {err!r}") from err
    if not entries:
        raise BankFileError(f"{path}: code bank holds no entries")
    for e in entries:
        tensors_to_check = list(e["codes"].values()) + ([e["mean"], e["var"]] if e["mean"] is not None else [])
        if not all(bool(torch.isfinite(t).all()) for t in tensors_to_check):
            raise BankFileError(f"{path}: entry {e['id']} holds non-finite values")
        if e["mean"] is not None and (e["mean"].shape != e["var"].shape or not bool((e["var"] > 0).all())):
            raise BankFileError(f"{path}: entry {e['id']} has an invalid descriptor (shapes or non-positive variance)")
    return entries, next_id


def _integer(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BankFileError(f"{what} is {v!r}, not an integer")
    return v


def _parse_entries(meta: dict, tensors: dict[str, Tensor], path: str) -> tuple[list[dict], int]:
    """Entries from the metadata, every field type-checked and every tensor's dtype and shape checked."""
    if not isinstance(meta.get("entries"), list):
        raise BankFileError(f"{path}: metadata field 'entries' is missing or not a list")
    entries = []
    for i, m in enumerate(meta["entries"]):
        p = f"e{i}"
        if not isinstance(m, dict):
            raise BankFileError(f"{path}: metadata of entry {i} is not an object")
        eid = _integer(m.get("id"), f"{path}: entry {i} field 'id'")
        created = _integer(m.get("created_at"), f"{path}: entry {i} field 'created_at'")
        weight = m.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not (math.isfinite(weight) and weight > 0):
            raise BankFileError(f"{path}: entry {i} field 'weight' is {weight!r}, not a positive number")
        if not isinstance(m.get("has_stats"), bool):
            raise BankFileError(f"{path}: entry {i} field 'has_stats' is {m.get('has_stats')!r}, not a boolean")
        layers = m.get("layers")
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise BankFileError(f"{path}: entry {i} field 'layers' is not a list of layer names")
        need = [f"{p}.s.{name}" for name in layers] + ([f"{p}.mean", f"{p}.var"] if m["has_stats"] else [])
        missing = [k for k in need if k not in tensors]
        if missing:
            raise BankFileError(f"{path}: entry {i} lacks tensors {missing[:4]}")
        for k in need:
            t = tensors[k]
            if not t.dtype.is_floating_point:
                raise BankFileError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a floating-point dtype")
            if k.endswith((".mean", ".var")) and t.dim() != 1:
                raise BankFileError(f"{path}: tensor {k!r} has shape {list(t.shape)}, expected one dimension "
                                    "(one value per channel)")
        codes = {name: tensors[f"{p}.s.{name}"] for name in layers}
        opt = None if m.get("optimizer") is None else _decode(m["optimizer"], tensors)
        entries.append({"id": eid, "created_at": created, "weight": float(weight),
                        "mean": tensors[f"{p}.mean"] if m["has_stats"] else None,
                        "var": tensors[f"{p}.var"] if m["has_stats"] else None,
                        "codes": codes, "optimizer_state": opt})
    next_id = _integer(meta.get("next_id"), f"{path}: metadata field 'next_id'")
    return entries, next_id
