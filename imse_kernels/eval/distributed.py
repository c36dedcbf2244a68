"""`imse-eval` under `torchrun` (docs/design.md §9): every rank runs the same stream; data-parallel adapters
get the process group and each rank its shard of every batch.

`Sharded` wraps such an adapter for the runner: it passes the rank's contiguous shard (rank order) of the
global batch to the adapter and all-gathers the shard logits, so every rank scores the whole batch (the
gather is for scoring only, not part of the adaptation) and the results equal one process's. Rank 0 alone
prints and writes them.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..tta import Source, registry
from ..tta.distributed import DEFAULT_TIMEOUT_S, GroupComm, init_distributed
from .usage import UsageError


def parallel_methods() -> list[str]:
    """The registered methods that run under torchrun: the data-parallel ones (`data_parallel`, they take
    `process_group`) and Source, which needs no communication at all."""
    return [n for n, e in registry.REGISTRY.items() if e.cls is Source or getattr(e.cls, "data_parallel", False)]


def shard_slice(n: int, world: int, rank: int) -> slice:
    """Rank `rank`'s contiguous part of n items split as evenly as possible, in rank order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class Sharded:
    """`adapter(x)` on this rank's shard of the global batch `x`; returns the logits of the whole batch."""

    def __init__(self, adapter, comm: GroupComm) -> None:
        self.adapter, self.comm = adapter, comm

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] < self.comm.world_size:
            raise ValueError(f"imse-eval: a batch of {x.shape[0]} images cannot be split over {self.comm.world_size} "
                             "ranks; use a batch size of at least the number of ranks")
        logits = self.adapter(x[shard_slice(x.shape[0], self.comm.world_size, self.comm.rank)])
        return self.comm.all_gather_rows(logits.detach(), "logits for scoring")

    def __getattr__(self, name):  # events, skipped_steps, reset, config, ...
        return getattr(self.adapter, name)


def setup(timeout_s: float = DEFAULT_TIMEOUT_S, device: Optional[torch.device] = None) -> Optional[GroupComm]:
    """Form the group when launched by torchrun with more than one rank (gloo on the CPU, nccl on CUDA);
    None otherwise."""
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if not init_distributed(backend, timeout_s):
        return None
    return GroupComm(dist.group.WORLD, "imse-eval")


def check_methods(names, comm: Optional[GroupComm]) -> None:
    """Under torchrun only data-parallel methods run: the others would adapt each shard on its own."""
    if comm is None:
        return
    ok = parallel_methods()
    bad = [n for n in names if n not in ok]
    if bad:
        raise UsageError(f"under torchrun ({comm.world_size} ranks) only data-parallel methods run "
                         f"({', '.join(ok)}); {', '.join(bad)} would adapt each rank's shard on its "
                         "own. Pass --method with those, or run the others in one process.")
