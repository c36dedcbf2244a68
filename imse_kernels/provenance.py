"""What was run, for the results files of `imse-eval` and of the benchmarks: versions, git commit, device and
machine (`environment`, the benchmarks' `env`), and for an evaluation the model and checkpoint hash and every
method's hyper-parameters (`collect`). Every function here answers None (or leaves a field out) rather than
raise: recording provenance must never stop a run.
"""
import dataclasses
import datetime
import hashlib
import importlib.metadata
import math
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .proc_status import cpu_model

#: Distributions whose versions are recorded (None when not installed).
PACKAGES = ("torch", "timm", "numpy", "safetensors", "triton", "scikit-learn", "torchvision", "pillow")


def sha256_file(path, chunk: int = 1 << 20) -> Optional[str]:
    """Hex SHA-256 of a file's bytes (None when it cannot be read)."""
    try:
        h = hashlib.sha256()
        with open(Path(path).expanduser(), "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        return h.hexdigest()
    except (OSError, TypeError):
        return None


def versions() -> dict:
    """python, imse_kernels and the dependencies' versions (from the installed distributions' metadata, so
    nothing is imported; None for what is not installed)."""
    out = {"python": platform.python_version()}
    try:
        out["imse_kernels"] = importlib.metadata.version("imse_kernels")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        out["imse_kernels"] = None
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the imported one (a local build may differ from the metadata)
    out["torch_cuda"] = torch.version.cuda
    return out


def _checkout_root() -> Optional[Path]:
    """The git checkout the imported package lives in (an editable install or a source tree), else None."""
    root = Path(__file__).resolve().parent.parent  # imse_kernels/provenance.py -> the checkout
    return root if (root / ".git").exists() else None


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        # --no-optional-locks: a read never takes the index lock (others may be working in the checkout)
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def git_info(root: Optional[Path] = None) -> dict:
    """{"commit": HEAD or None, "dirty": tracked files modified (None when unknown)} of the package's checkout;
    both None outside a git checkout (an installed copy) or without git."""
    root = _checkout_root() if root is None else Path(root)
    if root is None:
        return {"commit": None, "dirty": None}
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_info(device) -> dict:
    """The device the methods ran on, by name: the CPU model always, the CUDA device's name on a GPU."""
    device = torch.device(device)
    out = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           "platform": platform.platform()}
    if device.type == "cuda":
        try:
            p = torch.cuda.get_device_properties(device)
            out.update(cuda_device=p.name, cuda_capability=f"{p.major}.{p.minor}",
                       cuda_memory_gib=round(p.total_memory / 2 ** 30, 1))
        except (RuntimeError, AssertionError, AttributeError):
            out["cuda_device"] = None
    return out


def environment(device, root=None) -> dict:
    """The machine and software a measurement ran on, as one flat record (the benchmarks' `env`): time, host,
    python, platform, CPU, torch's threads, OpenMP's wait policy, torch (and its CUDA), triton, timm, the git
    commit of `root` (default: the package's checkout) and, on CUDA, the GPU."""
    dev, v = device_info(device), versions()
    git = git_info(root)
    info = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": v["python"],
        "platform": dev["platform"],
        "cpu": dev["cpu"],
        "cpu_count": dev["cpu_count"],
        "torch_threads": dev["threads"],
        # PASSIVE makes idle OpenMP threads sleep: robust on shared cores, slower small GEMMs
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "torch": v["torch"],
        "torch_cuda": v["torch_cuda"],
        "triton": v["triton"],
        "timm": v["timm"],
        "git_commit": git["commit"],
        "git_dirty": bool(git["dirty"]),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info.update(gpu=dev.get("cuda_device"), gpu_memory_gib=dev.get("cuda_memory_gib"),
                    gpu_capability=dev.get("cuda_capability"))
    return info


def jsonable(v):
    """Plain JSON values for a config: tuples to lists, tensors and numpy scalars to numbers, enums and other
    objects to their repr; NaN/inf kept as floats (json writes them as NaN/Infinity)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return jsonable(dataclasses.asdict(v))
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        try:
            return v.item()
        except (TypeError, ValueError):
            pass
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return repr(v)


def _optimizer_settings(opt: torch.optim.Optimizer) -> dict:
    groups = []
    for g in opt.param_groups:
        settings = {k: jsonable(v) for k, v in g.items() if k != "params"}
        settings["n_params"] = len(g["params"])
        groups.append(settings)
    out = {"class": type(opt).__name__, "param_groups": groups}
    inner = getattr(opt, "base_optimizer", None)  # SAM-like wrappers
    if isinstance(inner, torch.optim.Optimizer):
        out["base_optimizer"] = type(inner).__name__
    return out


_SIMPLE = (bool, int, float, str)


def method_config(adapter) -> dict:
    """Every hyper-parameter of an adapter, JSON-ready. `class` names the adapter; Source has nothing else.

    An adapter with a dataclass `config` (every method of `tta.method`): that dataclass as a dict, and where
    the adapter has them its `optimizer`'s class and settings and its effective learning rate `lr` (the config's
    lr scaled for the batch size, `tta.lr_scaling`) as `effective_lr`. Otherwise the adapter's own settings: an
    `optimizer` (torch.optim) gives its class and every param-group setting (lr, betas, momentum, weight
    decay, ...), plus the adapter's public plain attributes."""
    out = {"class": type(adapter).__name__}
    try:
        cfg = getattr(adapter, "config", None)
        opt = getattr(adapter, "optimizer", None)
        if (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)) or isinstance(cfg, dict):
            out["config"] = jsonable(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))
            if isinstance(opt, torch.optim.Optimizer):
                out["optimizer"] = _optimizer_settings(opt)
            lr = getattr(adapter, "lr", None)
            if isinstance(lr, float):
                out["effective_lr"] = lr
            return out
        if isinstance(opt, torch.optim.Optimizer):
            out["optimizer"] = _optimizer_settings(opt)
        counters = ("skipped_steps", "steps_taken", "training")
        for k, v in sorted(vars(adapter).items()):
            if k.startswith("_") or k in counters:
                continue
            if isinstance(v, _SIMPLE) and not (isinstance(v, float) and math.isnan(v)):
                out[k] = v
            elif isinstance(v, (list, tuple)) and v and all(isinstance(x, _SIMPLE) for x in v) and len(v) <= 64:
                out[k] = list(v)
    except Exception as err:  # noqa: BLE001 - provenance never stops a run
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def collect(*, model: str, checkpoint: Optional[str], device, images_per_domain: int, seeds: dict, setting: str,
            severity: int, dirichlet: Optional[float] = None, methods: Optional[dict] = None,
            extra: Optional[dict] = None) -> dict:
    """The provenance record of one results file."""
    record = {
        "model": model,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": None if checkpoint is None else sha256_file(checkpoint),
        "images_per_domain": images_per_domain,
        "seeds": seeds,
        "setting": setting,
        "severity": severity,
        "dirichlet": dirichlet,
        "methods": methods or {},
        "versions": versions(),
        "git": git_info(),
        "device": device_info(device),
    }
    if extra:
        record.update(extra)
    return record


def summary_line(record: dict) -> str:
    """One line for the printed header: model + hash, versions, commit, device."""
    sha = record.get("checkpoint_sha256")
    v = record.get("versions", {})
    git = record.get("git", {})
    dev = record.get("device", {})
    commit = git.get("commit")
    parts = [f"model {record.get('model')}" + (f" (sha256 {sha[:12]})" if sha else ""),
             f"torch {v.get('torch')}, timm {v.get('timm')}, numpy {v.get('numpy')}",
             "git " + (f"{commit[:10]}{' (modified)' if git.get('dirty') else ''}" if commit else "-"),
             dev.get("cuda_device") or dev.get("cpu") or "-"]
    return " · ".join(parts)
