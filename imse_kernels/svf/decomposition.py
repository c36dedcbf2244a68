"""The SVD of a checkpoint's adapted matrices: computed once, saved to a checksummed safetensors file,
reloaded and checked against the checkpoint (docs/design.md, section 15).

The file holds `<name>.U`, `<name>.S`, `<name>.Vh` per matrix (U, Vh in the weight's dtype, S in float32)
and, under the metadata key `imse_svf_decomposition`, each matrix's shape, dtype and the SHA-256 of the
weight it came from. `imse_kernels.state_file` adds the digests of every tensor and of the metadata, so
a damaged or truncated file is rejected with `StateFileError`, and a file made from another checkpoint
is rejected by the weight digests.
"""
import os
import time
from typing import Optional

import torch
from torch import Tensor, nn

from ..layers.conv1d import linear_weight
from ..state_file import (
    StateFileError,
    atomic_write_bytes,
    dumps_safetensors,
    loads_safetensors,
    read_bytes,
    sha256_hex,
    tensor_bytes,
)

META_KEY = "imse_svf_decomposition"
FORMAT = 1
Factors = tuple[Tensor, Tensor, Tensor]


def svd_factors(weight: Tensor, svd_dtype: torch.dtype = torch.float32) -> Factors:
    """Thin SVD of a (d_out, d_in) weight on its own device: U (d_out, r), S (r,), Vh (r, d_in), all in
    `svd_dtype` (float32 is accurate to ~1e-6 of the weight; float64 is for tests)."""
    if weight.dim() != 2:
        raise ValueError(f"svd_factors: expected a 2-D weight, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        return torch.linalg.svd(weight.detach().to(svd_dtype), full_matrices=False)


def decompose(model: nn.Module, names: list[str], svd_dtype: torch.dtype = torch.float32,
              log=None) -> dict[str, Factors]:
    """name → (U, S, Vh) of each named nn.Linear / Conv1D weight (nn.Linear layout), U and Vh cast to the
    weight's dtype, S kept in `svd_dtype`. `log(name, seconds)` is told the time of each SVD."""
    out = {}
    for name in names:
        weight, _ = linear_weight(model.get_submodule(name))
        start = time.perf_counter()
        U, S, Vh = svd_factors(weight, svd_dtype)
        out[name] = (U.to(weight.dtype), S, Vh.to(weight.dtype))
        if log is not None:
            log(name, time.perf_counter() - start)
    return out


def _weight_record(module: nn.Module) -> dict:
    weight, _ = linear_weight(module)
    return {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "weight_sha256": sha256_hex(tensor_bytes(module.weight))}


def save_decomposition(path: "os.PathLike | str", model: nn.Module, factors: dict[str, Factors]) -> None:
    """Write `factors` (from `decompose`) atomically, with the digests of the weights they came from."""
    tensors, layers = {}, {}
    for name, (U, S, Vh) in factors.items():
        tensors.update({f"{name}.U": U, f"{name}.S": S.float(), f"{name}.Vh": Vh})
        layers[name] = _weight_record(model.get_submodule(name))
    atomic_write_bytes(path, dumps_safetensors(tensors, META_KEY, {"format": FORMAT, "layers": layers}))


def load_decomposition(path: "os.PathLike | str", model: Optional[nn.Module] = None,
                       names: Optional[list[str]] = None, check_weights: bool = True) -> dict[str, Factors]:
    """The factors saved by `save_decomposition`. Raises `StateFileError` when the file is damaged or not
    a decomposition, and when `model` is given and a named layer is missing from the file or (with
    `check_weights`) its weight is not the one the file was computed from."""
    loaded = loads_safetensors(read_bytes(path), META_KEY)
    where = f"decomposition file {os.fspath(path)!r}"
    if loaded.meta is None or not loaded.verified:
        raise StateFileError(f"{where} is not an imse_kernels SVF decomposition (no checksummed metadata)")
    layers = loaded.meta.get("layers")
    if loaded.meta.get("format") != FORMAT or not isinstance(layers, dict):
        raise StateFileError(f"{where} has format {loaded.meta.get('format')!r}; this version reads {FORMAT}")
    names = list(layers) if names is None else list(names)
    out = {}
    for name in names:
        if name not in layers:
            raise StateFileError(f"{where} has no factors for layer {name!r}; it holds {sorted(layers)[:8]}...")
        t = loaded.tensors
        out[name] = (t[f"{name}.U"], t[f"{name}.S"], t[f"{name}.Vh"])
        if model is None:
            continue
        record = _weight_record(model.get_submodule(name)) if check_weights else None
        want = layers[name]
        if record is not None and (record["shape"] != want.get("shape") or record["dtype"] != want.get("dtype")):
            raise StateFileError(f"{where}: layer {name!r} is {record['dtype']} {record['shape']} in the model but "
                                 f"{want.get('dtype')} {want.get('shape')} in the file (another checkpoint?)")
        if record is not None and record["weight_sha256"] != want.get("weight_sha256"):
            raise StateFileError(f"{where}: the weight of layer {name!r} differs from the one the file was "
                                 "computed from (another checkpoint?); delete the file to decompose again")
    return out
