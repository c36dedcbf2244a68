"""One rank of the data-parallel IMSE tests (tests/tta/test_data_parallel.py), run as a separate process.

    python tests/dp_worker.py OUT RANK WORLD INIT [--fault none|config|weights|die|stall|never] [--streams]

WORLD 0 runs one process without a process group (the specification). Each rank adapts its shard of every
global batch (contiguous, in rank order, possibly unequal) and writes its logits, `s`, bank events and
communication counts (or the error it raised, and when) to OUT with torch.save.
"""
import argparse
import os
import sys
import time

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from helpers import tiny_vit  # noqa: E402  (tests/, this script's folder, is on sys.path)

from imse_kernels.tta import IMSE, IMSEConfig, MultiStreamIMSE  # noqa: E402
from imse_kernels.tta.distributed import init_distributed  # noqa: E402

BATCH = 10  # global batch; 2 ranks: 5 + 5, 3 ranks: 4 + 3 + 3


def model_and_stream(seed: int = 0):
    m = tiny_vit(seed=seed)  # its head scaled: some samples pass the entropy filter
    g = torch.Generator().manual_seed(seed + 1)
    domains = [(1.0, 0.0), (3.0, 1.0), (1.0, 0.0), (0.5, -1.0)]  # (scale, offset): shifts at batches 3, 6, 9
    xs = [torch.randn(BATCH, 3, 32, 32, generator=g) * a + b for a, b in domains for _ in range(3)]
    return m, xs


def shard(n: int, world: int, rank: int) -> slice:
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("rank", type=int)
    p.add_argument("world", type=int)
    p.add_argument("init")
    p.add_argument("--fault", default="none")
    p.add_argument("--streams", action="store_true")
    p.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()
    result = {"rank": a.rank}
    t0 = time.monotonic()
    try:
        group = None
        if a.world > 0:
            if a.fault == "never" and a.rank > 0:
                return  # this rank never joins
            init_distributed("gloo", a.timeout, init_method=a.init, rank=a.rank, world_size=a.world)
            group = dist.group.WORLD
        model, xs = model_and_stream()
        if a.fault == "weights" and a.rank == 1:
            with torch.no_grad():
                model.blocks[0].mlp.fc1.weight[0, 0] += 1e-3
        cfg = IMSEConfig(stats_window=BATCH, lr=5e-3 if a.fault == "config" and a.rank == 1 else 7e-3)
        if a.streams:
            run_streams(model, xs, cfg, group, a, result)
        else:
            run_imse(model, xs, cfg, group, a, result)
    except Exception as err:  # noqa: BLE001 - the test inspects it
        result["error"] = f"{type(err).__name__}: {err}"
        result["error_type"] = type(err).__name__
    result["seconds"] = time.monotonic() - t0
    torch.save(result, a.out)
    sys.stdout.flush()
    os._exit(0)  # do not wait on a dead peer at interpreter exit


def run_imse(model, xs, cfg, group, a, result) -> None:
    adapter = IMSE(model, cfg, process_group=group)
    world = max(a.world, 1)
    logits = []
    for i, x in enumerate(xs):
        if a.fault == "die" and a.rank == 1 and i == 2:
            os._exit(3)
        if a.fault == "stall" and a.rank == 1 and i == 2:
            time.sleep(3 * a.timeout)  # alive, but not at the collective
            os._exit(4)
        logits.append(adapter(x[shard(x.shape[0], world, 0 if group is None else a.rank)]))
        if i == 0 and adapter._comm is not None:
            result["bytes_first_step"] = dict(adapter._comm.counter.bytes)
            result["calls_first_step"] = dict(adapter._comm.counter.calls)
    result["logits"] = logits
    result["s"] = {n: m.s.detach().clone() for n, m in adapter.layers.items()}
    result["events"] = [(e.batch, e.kind, e.entry, None if e.kl is None else float(e.kl)) for e in adapter.events]
    result["steps_taken"] = adapter.steps_taken


def run_streams(model, xs, cfg, group, a, result) -> None:
    """Four streams; with a group each rank owns streams round-robin and gets only their samples."""
    k = 4
    adapter = MultiStreamIMSE(model, k, cfg, process_group=group)
    owned = adapter.owned_streams
    logits = []
    for x in xs:
        streams = torch.arange(x.shape[0]) % k
        keep = torch.isin(streams, torch.tensor(owned))
        logits.append((keep.nonzero().squeeze(1), adapter(x[keep], streams[keep])))
    result["owned"] = owned
    result["logits"] = logits
    result["codes"] = {kk: adapter.stream_codes(kk) for kk in owned}
    result["events"] = {kk: [(e.batch, e.kind, e.entry) for e in adapter.banks[adapter._stream_index(kk)].events]
                        for kk in owned}


if __name__ == "__main__":
    main()
