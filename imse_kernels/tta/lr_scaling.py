"""Learning rates scaled with the batch size as each method's authors scale them (docs/design.md, section 12).

`lr` is the value at batch 64; `lr_scaling` names the rule (`none`, `linear`: lr / 64 · b, `resnet`) and
`lr_batch1_factor` the factor at batch 1, computed operation by operation as the authors' scripts do.
"""
from typing import Optional

LR_SCALING = ("none", "linear", "resnet")
#: The batch size the configs' learning rates are given for.
REFERENCE_BATCH = 64


def scaled_lr(lr: float, rule: str, batch_size: Optional[int], batch1_factor: float = 1.0) -> float:
    """The learning rate for a stream of `batch_size` images per batch (module doc); `lr` when it is None."""
    if rule not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    if batch_size is None:
        return lr
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    b = batch_size
    if rule == "linear":
        lr = (lr / REFERENCE_BATCH) * b
    elif rule == "resnet":
        lr = (lr / REFERENCE_BATCH) * b * 2 if b < 32 else lr
    return batch1_factor * lr if b == 1 else lr
