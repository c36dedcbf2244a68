"""The set-up stage (docs/design.md, section 12): from a checked `Plan`, what one `imse-eval` invocation works
with: the device, torch's CPU threads, the process group under torchrun, the log and the loaded data."""
from dataclasses import dataclass
from typing import Optional

import torch

from ..precision import check_autocast
from ..tta import IMSEConfig, registry
from ..tta.distributed import GroupComm
from . import distributed as dist_eval
from .checks import short_domain_warning
from .data_spec import Data, build_data
from .progress import Log
from .run_config import Plan
from .usage import UsageError


@dataclass
class Session:
    device: torch.device
    comm: Optional[GroupComm]   # None: one process
    log: Log                    # quiet on ranks other than 0
    data: Data                  # model on `device` in eval mode, source batches on `device`

    @property
    def reports(self) -> bool:
        """Whether this process prints and writes the results (rank 0, or the only process)."""
        return self.comm is None or self.comm.rank == 0


def pick_device(spec: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...; `UsageError` when CUDA is asked for but absent."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"--device {spec!r} is not a device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    return dev


def detector_window(configs: dict) -> Optional[int]:
    """The shift detector's window (images) of the run's IMSE methods, None when none runs."""
    windows = [c.stats_window for c in configs.values() if isinstance(c, IMSEConfig)]
    return windows[0] if windows else None  # the one the runner scores the detector with


def set_up(plan: Plan) -> Session:
    """The set-up stage: threads, device, process group, log, and the data and model (`build_data`)."""
    run = plan.run
    if run.threads:
        torch.set_num_threads(run.threads)
    device = pick_device(run.device)
    check_autocast(device, run.amp)  # refuses bf16/fp16 on a CPU that only emulates it (docs/design.md, section 14)
    comm = dist_eval.setup(plan.invocation.dist_timeout, device)
    dist_eval.check_methods(run.methods, comm)
    if comm is not None:
        if run.setting == "multi_stream":
            raise UsageError("--setting multi_stream runs in one process (MultiStreamIMSE shards streams across "
                             "ranks through its process_group argument, not through imse-eval)")
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    log = Log(quiet=comm is not None and comm.rank != 0)
    data = build_data(plan.data, log)
    run.corruptions = tuple(data.corruptions)  # a folder's `all` resolved: what results.json records and reruns
    window = detector_window(plan.config.methods)
    short = window and data.domain_size and short_domain_warning(data.domain_size, window, run.batch_size)
    if short:
        data.warnings.append(short)
        log(short)
    data.model = data.model.to(device).eval()
    if data.source is not None:
        data.source = [x.to(device) for x in data.source]
    elif plan.data.source != "digits":
        users = [m for m in run.methods if getattr(registry.entry(m).cls, "uses_source", False)]
        if users:
            why = "no --source-dir" if plan.data.source == "imagenet-c" else f"no clean source data for {run.data}"
            log(f"note: {why}; {', '.join(users)} run without clean source data (EATA without its "
                "Fisher regulariser, IMSE's code bank without source statistics)")
    return Session(device, comm, log, data)
