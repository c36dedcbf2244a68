"""The collectives of data-parallel IMSE over `torch.distributed` (docs/design.md, section 9).

`GroupComm` all-reduces the step statistics and gradients, all-gathers the per-image domain moments, checks at
start that every rank holds the same model and config, and counts the bytes of each collective; a failure is a
`DistributedError` naming the rank and collective. `init_distributed` forms the group from torchrun's environment.
"""
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 120.0


class DistributedError(RuntimeError):
    """A collective of data-parallel IMSE failed, or the ranks disagree on the model or config."""


@dataclass
class CommCounter:
    """Collectives issued by this rank and the bytes of their payloads (what each rank sends in)."""
    calls: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)

    def add(self, what: str, nbytes: int) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1
        self.bytes[what] = self.bytes.get(what, 0) + int(nbytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


class GroupComm:
    """The collectives of one adapter over `group` (a `torch.distributed` process group)."""

    def __init__(self, group, who: str) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(f"{who}: process_group was given but torch.distributed is not initialised; call "
                                   "torch.distributed.init_process_group (or imse_kernels.tta.distributed."
                                   "init_distributed under torchrun) first")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{who}: process_group must be a torch.distributed.ProcessGroup "
                            f"(e.g. torch.distributed.group.WORLD), got {type(group).__name__}")
        self.group, self.who = group, who
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.counter = CommCounter()

    def _device(self, t: Tensor) -> Tensor:
        """nccl moves CUDA tensors only; gloo takes CPU (and CUDA) tensors."""
        return t if self.backend != "nccl" or t.is_cuda else t.cuda()

    def _failed(self, what: str, err: Exception) -> DistributedError:
        return DistributedError(
            f"{self.who}: the collective '{what}' failed on rank {self.rank} of {self.world_size} ({self.backend}): "
            f"another rank died, stopped adapting, or did not reach this step within the process group's timeout. "
            f"Every rank must call the adapter on every batch. Cause: {type(err).__name__}: {err}")

    def all_reduce_sum_(self, t: Tensor, what: str) -> Tensor:
        """Sum `t` over the ranks, in place (the result is bitwise the same on every rank)."""
        buf = self._device(t)
        self.counter.add(what, buf.numel() * buf.element_size())
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as err:
            raise self._failed(what, err) from err
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_rows(self, t: Tensor, what: str) -> Tensor:
        """Every rank's `t` (rows may differ in number), concatenated along dim 0 in rank order."""
        try:
            n = self._device(torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
            sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
            dist.all_gather(sizes, n, group=self.group)
            sizes = [int(s) for s in sizes]
            padded = self._device(t.new_zeros((max(sizes), *t.shape[1:])))
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            self.counter.add(what, n.numel() * 8 + padded.numel() * padded.element_size())
            dist.all_gather(parts, padded, group=self.group)
        except RuntimeError as err:
            raise self._failed(what, err) from err
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)

    def check_same(self, fields: dict[str, str]) -> None:
        """Raise `DistributedError` on every rank unless every rank passed the same `fields` (name -> digest)."""
        names = sorted(fields)
        mine = torch.tensor([int(fields[k][:15], 16) for k in names], dtype=torch.int64)
        parts = [torch.zeros_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, self._device(mine), group=self.group)
        except RuntimeError as err:
            raise self._failed("start-up check", err) from err
        bad = [(q, names[i]) for q, p in enumerate(parts) for i in range(len(names)) if int(p[i]) != int(parts[0][i])]
        if bad:
            detail = "; ".join(f"rank {q}'s {what} differs from rank 0's" for q, what in bad[:6])
            raise DistributedError(f"{self.who}: the ranks disagree at start: {detail}. Every rank must build the same "
                                   "model (same weights, same spectralization) and the same config")


def digest(*parts) -> str:
    """SHA-256 hex of `parts`: tensors by their bytes (dtype and shape included), everything else by repr."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def model_digests(model: torch.nn.Module) -> dict[str, str]:
    """Digests of a model's structure (names, shapes, dtypes, trainable flags) and of its values."""
    tensors = list(model.state_dict().items())
    return {
        "model structure": digest([(k, tuple(v.shape), str(v.dtype)) for k, v in tensors],
                                  [(n, p.requires_grad) for n, p in model.named_parameters()]),
        "model weights": digest(*(v for _, v in tensors)),
    }


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S, init_method: str = "env://",
                     rank: Optional[int] = None, world_size: Optional[int] = None) -> bool:
    """Initialise torch.distributed; by default from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Returns False (and does nothing) for a world of 1 (e.g. outside torchrun). backend None: nccl when CUDA is
    available, else gloo. A rank that never joins makes the others fail within `timeout_s` with a
    `DistributedError`, as does any collective later that a rank does not reach.
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    if world <= 1:
        return False
    if dist.is_initialized():
        return True
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {} if rank is None else {"rank": int(rank), "world_size": world}
    where = (f"MASTER_ADDR:MASTER_PORT={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
             if init_method == "env://" else init_method)
    try:
        dist.init_process_group(backend, init_method=init_method, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    except (RuntimeError, ValueError) as err:  # DistStoreError (a rank never joined) is a RuntimeError
        raise DistributedError(
            f"torch.distributed could not form the group of {world} ranks (rank "
            f"{os.environ.get('RANK') if rank is None else rank}, {backend}, timeout {timeout_s:g} s): a rank did "
            f"not start or cannot reach {where}. Cause: {type(err).__name__}: {err}") from err
    return True
