"""Learning rates scaled with the batch size as each method's authors scale them (docs/design.md, section 12).

A config's `lr` is the value at the reference batch of 64; `lr_scaling` names the rule and `batch_size` the
stream's batch (None: `lr` is used as given). The arithmetic follows the authors' scripts operation by
operation, so the results are the same floats:
    none     lr                                   IMSE (main.py: cfg.OPTIM.LR at any TEST.BATCH_SIZE), CoTTA
                                                  (imagenetc.py: cfg.OPTIM.LR), Tent
    linear   lr / 64 · b                          SAR and EATA (mr-eggplant/SAR main.py lines 191–193) and DeYO
                                                  (Jhyun17/DeYO main.py lines 350–352) for vitbase_timm
    resnet   lr / 64 · b · 2 below b = 32, lr from 32 on: the same scripts for resnet50_gn / resnet50_bn
then, at b = 1, · lr_batch1_factor: SAR and DeYO double it ("double lr for sar/DeYO under bs=1", SAR
main.py lines 205–207, DeYO main.py lines 373–379).
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
