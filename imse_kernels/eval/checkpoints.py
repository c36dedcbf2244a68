"""Checkpoints as people keep them: find the weights, read them without running pickled code, name the keys.

Safetensors, torch files (`weights_only=True`; classes they name become inert stand-ins), model directories,
`hf-hub:` names from the local cache (never downloaded), timm's `.npz`. Every problem is a DataError of one line:
the file, what is wrong, what to pass (docs/design.md, section 13).
"""
import argparse
import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import DataError, reason

#: Weight files of a model directory (a Hugging Face snapshot), in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: Keys under which training scripts keep the weights, in the order they are tried.
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net", "network")
EMA_KEYS = ("state_dict_ema", "model_ema")

#: Prefixes that wrappers put before every key: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

HF_PREFIX = "hf-hub:"


# --------------------------------------------------------------------------------------------- finding files


def hf_hub_cached(repo_id: str) -> tuple[Path, Optional[dict]]:
    """(weights file, parsed config.json or None) of a Hugging Face repo in the local cache; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        raise DataError(None, f"{HF_PREFIX}{repo_id} needs huggingface_hub", "pip install huggingface_hub, or pass "
                        "--checkpoint FILE") from None
    for name in WEIGHT_FILES:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            cfg = try_to_load_from_cache(repo_id, "config.json")
            config = _read_json(Path(cfg)) if isinstance(cfg, str) and os.path.isfile(cfg) else None
            return Path(hit), config
    from huggingface_hub.constants import HF_HUB_CACHE

    raise DataError(f"{HF_PREFIX}{repo_id}", f"not in the local Hugging Face cache ({HF_HUB_CACHE}); nothing is "
                    "downloaded", f"fetch it once where there is network (hf download {repo_id}) and set HF_HOME "
                    "or HF_HUB_CACHE to that cache, or pass --checkpoint FILE")


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def resolve_checkpoint(spec: str) -> tuple[Path, Optional[dict]]:
    """(weights file, timm config.json of its directory or None) for a path, a model directory or `hf-hub:<repo>`."""
    if str(spec).startswith(HF_PREFIX):
        return hf_hub_cached(str(spec)[len(HF_PREFIX):])
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(path, "checkpoint file not found", "give --checkpoint the path of a local weights file "
                        "(nothing is downloaded)")
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name, _read_json(path / "config.json") if (path / "config.json").is_file() else None
        held = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise DataError(path, f"a directory without {' or '.join(WEIGHT_FILES)} (it holds: {held})",
                        "give --checkpoint the weights file itself")
    return path, None


# ------------------------------------------------------------------------------------------------ formats


def sniff(path: Path) -> str:
    """The file's format from its bytes: safetensors, torch-zip, torch-legacy, npz; else a DataError saying what
    the file is instead (config JSON, HTML page, Git LFS pointer, truncated download, ...)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        raise DataError(path, "empty file", "download or copy the checkpoint again")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise DataError(path, f"truncated or damaged zip/torch file ({size} bytes)",
                            "download or copy it again") from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise DataError(path, f"a zip archive that is not a torch checkpoint (holds {', '.join(names[:3])})",
                        "give the weights file itself")
    if head[:1] == b"\x80":
        return "torch-legacy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n < 100_000_000:
            if 8 + n > size:
                raise DataError(path, f"incomplete safetensors file: its header alone needs {8 + n} bytes, the file "
                                f"has {size}", "download it again (an interrupted download?)")
            return "safetensors"
    text = head.lstrip()
    if text.startswith(b"version https://git-lfs"):
        raise DataError(path, "a Git LFS pointer, not the weights", "run `git lfs pull` in its repository")
    if text[:1] in (b"{", b"["):
        cfg = _read_json(path) or {}
        what = "a model config (config.json)" if {"architecture", "model_type", "pretrained_cfg"} & set(cfg) else \
            "a JSON file"
        raise DataError(path, f"{what}, not weights", "give the weights file beside it: " + " or ".join(WEIGHT_FILES))
    if text[:1] == b"<":
        raise DataError(path, "an HTML/XML page, not weights (a failed download?)", "download the checkpoint again")
    raise DataError(path, f"not a checkpoint format this loader reads (starts {head[:8]!r})",
                    "give safetensors, a torch .pth/.pt/.bin, or timm's .npz")


class _StandIn(dict):
    """Takes the place of a class a checkpoint names (never imported): keeps the arguments and state."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _stand_ins(names) -> list:
    """(inert class, 'module.Name') pairs for torch's safe_globals."""
    return [(type(f"StandIn[{n}]", (_StandIn,), {}), n) for n in sorted(names)]


def _torch_load(path: Path, fmt: str) -> tuple[object, list[str]]:
    """torch.load(weights_only=True) with argparse.Namespace allowed and stand-ins for other named classes."""
    unsafe: list[str] = []
    if fmt == "torch-zip":
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except (RuntimeError, ValueError, EOFError) as exc:
            raise DataError(path, f"truncated or damaged torch file ({reason(exc)})", "download or copy it again") \
                from None
        unsafe = [n for n in unsafe if n != "argparse.Namespace"]
    allowed = [argparse.Namespace] + _stand_ins(unsafe)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for files it cannot read
        text = str(exc)
        if "Weights only load failed" in text or type(exc).__name__ == "UnpicklingError":
            first = text.split("\n")[0] if "Weights only load failed" not in text else \
                next((ln for ln in text.split("\n") if "GLOBAL" in ln or "Unsupported" in ln), text.split("\n")[0])
            raise DataError(path, f"cannot be read without running code it names ({first.strip()[:160]})",
                            "re-save its weights where you trust the file: torch.save(state_dict) or safetensors") \
                from None
        raise DataError(path, f"truncated or damaged torch file ({reason(exc)})", "download or copy it again") from None
    return obj, [n for _, n in _stand_ins(unsafe)]


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError
        raise DataError(path, f"damaged or incomplete safetensors file ({reason(exc)})",
                        "download it again (an interrupted download?)") from None


@dataclass
class StateDict:
    """Weights read from a checkpoint file, and how they were found."""

    tensors: dict
    path: Path
    format: str                  #: safetensors, torch-zip, torch-legacy
    container: str = "top level"  #: where in the file: "top level", "['state_dict']", "['model']", ...
    stripped: list = field(default_factory=list)  #: key prefixes removed (e.g. 'module.', 'model.')
    outside: list = field(default_factory=list)   #: keys left out: not under the stripped prefix
    notes: list = field(default_factory=list)     #: things the user should know (stand-ins, EMA weights present)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj, path: Path, fmt: str, use_ema: bool = False) -> StateDict:
    """The tensor dict inside a loaded checkpoint (see CONTAINER_KEYS), or a DataError naming the keys found."""
    where, notes = [], []
    for _ in range(3):  # nested containers: {'model': {'state_dict': ...}}
        if _is_state_dict(obj):
            break
        if not isinstance(obj, dict):
            break
        keys = (EMA_KEYS if use_ema else ()) + CONTAINER_KEYS
        key = next((k for k in keys if isinstance(obj.get(k), dict) and obj[k]), None)
        if key is None:
            break
        if not use_ema and any(isinstance(obj.get(k), dict) for k in EMA_KEYS):
            notes.append(f"the file also holds EMA weights ({', '.join(k for k in EMA_KEYS if k in obj)}); "
                         f"the ['{key}'] weights are used")
        where.append(f"['{key}']")
        obj = obj[key]
    if isinstance(obj, dict) and obj and not _is_state_dict(obj):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) // 2):
            notes.append(f"left out {len(obj) - len(tensors)} entries that are not tensors")
            obj = tensors
    if not _is_state_dict(obj):
        kind = type(obj).__name__ if not isinstance(obj, _StandIn) else type(obj).__name__
        keys = list(obj)[:6] if isinstance(obj, dict) else []
        inside = f" with keys {', '.join(map(str, keys))}" if keys else ""
        raise DataError(path, f"holds no weights{' at ' + ''.join(where) if where else ''}: a {kind}{inside}",
                        "give a file with a state dict (top level, or under 'state_dict' or 'model')")
    return StateDict(dict(obj), path, fmt, "".join(where) or "top level", notes=notes)


def read_state_dict(path: Path, use_ema: bool = False) -> StateDict:
    """The weights in a safetensors or torch file (see the module's docstring)."""
    fmt = sniff(path)
    if fmt == "safetensors":
        return StateDict(_load_safetensors(path), path, fmt)
    if fmt == "npz":
        raise DataError(path, "an .npz file", "it is read by timm's own loader (models.load_timm_model)")
    obj, stand_ins = _torch_load(path, fmt)
    sd = extract_state_dict(obj, path, fmt, use_ema)
    if stand_ins:
        sd.notes.append(f"classes named in the file were not imported (inert stand-ins): {', '.join(stand_ins)}")
    return sd


# ------------------------------------------------------------------------------------------ keys and shapes


def strip_prefixes(sd: StateDict, model_keys) -> StateDict:
    """Remove leading key prefixes (`module.`, `_orig_mod.`, `model.`, ...) while that makes more of the keys the
    model's; keys outside the chosen prefix (a Lightning module's other parts) are left out and recorded."""
    model_keys = set(model_keys)
    tensors = sd.tensors
    for _ in range(4):
        found = len(model_keys & set(tensors))
        if found == len(model_keys):
            break
        best, best_found = None, found
        for prefix in sorted({k.split(".", 1)[0] + "." for k in tensors if "." in k}):
            sub = {k[len(prefix):] for k in tensors if k.startswith(prefix)}
            n = len(model_keys & sub)
            if n > best_found:
                best, best_found = prefix, n
        if best is None:  # a wrapper around every key (torch.compile around DDP): unwrap, then look again
            best = next((w for w in WRAPPER_PREFIXES if all(k.startswith(w) for k in tensors)), None)
        if best is None:
            break
        sd.outside += [k for k in tensors if not k.startswith(best)]
        tensors = {k[len(best):]: v for k, v in tensors.items() if k.startswith(best)}
        sd.stripped.append(best)
    sd.tensors = tensors
    return sd


def _grid(tokens: int) -> Optional[int]:
    side = int(round(math.sqrt(tokens)))
    return side if side * side == tokens else None


def resample_warning(sd: StateDict, model: torch.nn.Module, name: str) -> Optional[str]:
    """A warning when timm would resample the file's patch or position embeddings to fit `model` (a model built
    at another image or patch size than the checkpoint was trained at), with the flags that build it as trained."""
    t = sd.tensors
    pe, pos = t.get("patch_embed.proj.weight"), t.get("pos_embed")
    mproj = getattr(getattr(model, "patch_embed", None), "proj", None)
    mpos = getattr(model, "pos_embed", None)
    if pe is None or mproj is None or pe.dim() != 4:
        return None
    patch_differs = tuple(pe.shape[-2:]) != tuple(mproj.weight.shape[-2:])
    pos_differs = pos is not None and isinstance(mpos, torch.Tensor) and tuple(pos.shape) != tuple(mpos.shape)
    if not (patch_differs or pos_differs):
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    file_grid = _grid(pos.shape[1] - prefix) if pos is not None and pos.dim() == 3 else None
    model_grid = tuple(getattr(model.patch_embed, "grid_size", ()))
    p_file = int(pe.shape[-1])
    hint = (f"pass --img-size {file_grid * p_file} --patch-size {p_file} to build it as trained" if file_grid
            else f"pass --patch-size {p_file} (and the --img-size it was trained at) to build it as trained")
    what = []
    if patch_differs:
        what.append(f"patch {p_file}x{int(pe.shape[-2])} -> {tuple(mproj.weight.shape[-2:])[0]}")
    if pos_differs and file_grid:
        what.append(f"position grid {file_grid}x{file_grid} -> {model_grid[0]}x{model_grid[-1]}")
    return (f"warning: {sd.path}: timm resamples its embeddings to fit {name} as built ({', '.join(what)}), which "
            f"changes the model; {hint}")


@dataclass
class KeyDiff:
    missing: list        #: model keys the file lacks
    unexpected: list     #: file keys the model lacks
    shapes: list         #: (key, file shape, model shape)


def diff_keys(tensors: dict, model_shapes: dict, resampled=("pos_embed", "patch_embed.proj.weight")) -> KeyDiff:
    """How the file's keys and shapes differ from the model's (embeddings timm resamples do not count)."""
    return KeyDiff([k for k in model_shapes if k not in tensors], [k for k in tensors if k not in model_shapes],
                   [(k, tuple(tensors[k].shape), tuple(model_shapes[k])) for k in model_shapes
                    if k in tensors and k not in resampled and tuple(tensors[k].shape) != tuple(model_shapes[k])])


def _shape(s) -> str:
    return "x".join(map(str, s)) or "scalar"


def head_error(sd: StateDict, model_shapes: dict, classifier: str, name: str, num_classes: Optional[int]):
    """The DataError for a file whose classifier has another number of classes than the model, else None."""
    w = f"{classifier}.weight"
    if w not in sd.tensors or w not in model_shapes or sd.tensors[w].dim() != len(model_shapes[w]):
        return None
    n_file, n_model = int(sd.tensors[w].shape[0]), int(model_shapes[w][0])
    if n_file == n_model or tuple(sd.tensors[w].shape[1:]) != tuple(model_shapes[w][1:]):
        return None
    given = "--num-classes " + str(num_classes) if num_classes is not None else f"timm's default {n_model}"
    return DataError(sd.path, f"its head has {n_file} classes ({w} {_shape(sd.tensors[w].shape)}) but {name} is built "
                     f"with {n_model} ({given})", f"pass --num-classes {n_file}")


def describe_vit(tensors: dict) -> Optional[str]:
    """'ViT: width 192, depth 12, patch 16, 14x14 grid, 1000 classes' for a timm-style ViT state dict, else None."""
    pe = tensors.get("patch_embed.proj.weight")
    if pe is None or pe.dim() != 4:
        return None
    depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    parts = [f"width {pe.shape[0]}", f"depth {depth}", f"patch {pe.shape[-1]}"]
    head = tensors.get("head.weight")
    if head is not None:
        parts.append(f"{head.shape[0]} classes")
    return "a ViT of " + ", ".join(parts)


def suggest_models(tensors: dict, name: str, limit: int = 24) -> list[str]:
    """timm model names whose tensors have the file's shapes (checked on the meta device, at most `limit`)."""
    import difflib

    import timm

    pe = tensors.get("patch_embed.proj.weight")
    family = name.split("_")[0]
    names = [n for n in timm.list_models(f"{family}*") if n != name]
    if pe is not None and pe.dim() == 4:
        names = [n for n in names if f"patch{pe.shape[-1]}" in n] or names
    names = sorted(names, key=lambda n: -difflib.SequenceMatcher(None, n, name).ratio())[:limit]
    head = tensors.get("head.weight")
    out = []
    for cand in names:
        try:
            with torch.device("meta"):
                kw = {"num_classes": int(head.shape[0])} if head is not None else {}
                m = timm.create_model(cand, pretrained=False, **kw)
        except Exception:  # a candidate timm cannot build on the meta device (or at all) is skipped
            continue
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        d = diff_keys(tensors, shapes)
        if not (d.missing or d.unexpected or d.shapes):
            out.append(cand)
        if len(out) == 3:
            break
    return out


def mismatch_error(sd: StateDict, model_shapes: dict, name: str, cause: Optional[BaseException] = None) -> DataError:
    """One line saying how the file differs from `name` and what to pass instead."""
    d = diff_keys(sd.tensors, model_shapes)
    file_is = describe_vit(sd.tensors)
    found = len(set(model_shapes) & set(sd.tensors))
    if found == 0:
        problem = (f"not a {name} checkpoint: none of its {len(model_shapes)} tensors is in the file (model: "
                   f"{next(iter(model_shapes), '-')}; file: {', '.join(list(sd.tensors)[:2])})")
    elif d.shapes:
        k, fs, ms = d.shapes[0]
        problem = (f"{len(d.shapes)} tensors differ in shape from {name} (e.g. {k}: {_shape(fs)} in the file, "
                   f"{_shape(ms)} in the model)")
    elif d.missing or d.unexpected:
        parts = []
        if d.missing:
            parts.append(f"{len(d.missing)} of {name}'s tensors are missing (e.g. {d.missing[0]})")
        if d.unexpected:
            parts.append(f"{len(d.unexpected)} in the file are not in {name} (e.g. {d.unexpected[0]})")
        problem = " and ".join(parts)
    else:
        problem = f"timm could not load it into {name} ({reason(cause) if cause else 'unknown reason'})"
    if file_is:
        problem += f"; the file is {file_is}"
    fix = "pass the --model it was trained as"
    if found:
        names = suggest_models(sd.tensors, name)
        if names:
            fix = f"pass --model {names[0]}" + (f" (or {', '.join(names[1:])})" if len(names) > 1 else "")
    return DataError(sd.path, problem, fix)
