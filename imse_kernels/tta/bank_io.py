"""Code bank files: safetensors tensors plus JSON metadata — nothing is unpickled on load.

Layout: tensors `e{i}.mean`, `e{i}.var` (descriptor), `e{i}.s.{layer}` (code), `e{i}.opt.{j}`
(optimizer-state tensors); metadata key `imse_code_bank` holds JSON with the format version, the
entries' ids and bookkeeping, and each optimizer state's structure with its tensors replaced by
references. Every problem found on reading raises `BankFileError` saying what is wrong.
"""
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "imse_kernels.code_bank"
VERSION = 1
_META_KEY = "imse_code_bank"


class BankFileError(ValueError):
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
    """entries: dicts with id, created_at, weight, mean, var (Tensor or None), codes, optimizer_state."""
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
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION, "next_id": int(next_id), "entries": meta_entries}
    save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(meta)})


def read_bank_file(path: "os.PathLike | str") -> tuple[list[dict], int]:
    """The entries (as written) and next_id; raises `BankFileError` on any inconsistency."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"code bank file not found: {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BankFileError(f"{path} is not a readable safetensors code bank (corrupted or truncated?): {err}") from err
    if raw is None:
        raise BankFileError(f"{path} is a safetensors file but not a code bank (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise BankFileError(f"{path}: code bank metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise BankFileError(f"{path}: not a code bank (format {fmt!r})")
    if meta.get("version") != VERSION:
        raise BankFileError(f"{path}: code bank version {meta.get('version')!r}, this library reads version {VERSION}")
    entries = []
    try:
        for i, m in enumerate(meta["entries"]):
            p = f"e{i}"
            need = [f"{p}.s.{name}" for name in m["layers"]] + ([f"{p}.mean", f"{p}.var"] if m["has_stats"] else [])
            missing = [k for k in need if k not in tensors]
            if missing:
                raise BankFileError(f"{path}: entry {i} lacks tensors {missing[:4]}")
            codes = {name: tensors[f"{p}.s.{name}"] for name in m["layers"]}
            opt = None if m["optimizer"] is None else _decode(m["optimizer"], tensors)
            entries.append({"id": int(m["id"]), "created_at": int(m["created_at"]), "weight": float(m["weight"]),
                            "mean": tensors[f"{p}.mean"] if m["has_stats"] else None,
                            "var": tensors[f"{p}.var"] if m["has_stats"] else None,
                            "codes": codes, "optimizer_state": opt})
        next_id = int(meta["next_id"])
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, BankFileError):
            raise
        raise BankFileError(f"{path}: malformed code bank metadata: {err!r}") from err
    for e in entries:
        tensors_to_check = list(e["codes"].values()) + ([e["mean"], e["var"]] if e["mean"] is not None else [])
        if not all(bool(torch.isfinite(t).all()) for t in tensors_to_check):
            raise BankFileError(f"{path}: entry {e['id']} holds non-finite values")
        if e["mean"] is not None and (e["mean"].shape != e["var"].shape or not bool((e["var"] > 0).all())):
            raise BankFileError(f"{path}: entry {e['id']} has an invalid descriptor (shapes or non-positive variance)")
    if not entries:
        raise BankFileError(f"{path}: code bank holds no entries")
    return entries, next_id
