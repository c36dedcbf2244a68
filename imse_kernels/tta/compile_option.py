"""The `compile=` option every method takes (docs/design.md, section 6, compiled step)."""
import torch


def compile_fn(fn, option, who: str = "adapter"):
    """`fn` through `torch.compile` as `option` says: False/None: None (eager); True: torch.compile's defaults
    (inductor); a str: that backend; a dict: `torch.compile` keywords."""
    if option is None or option is False:
        return None
    if option is True:
        kw = {}
    elif isinstance(option, str):
        kw = {"backend": option}
    elif isinstance(option, dict):
        kw = dict(option)
    else:
        raise TypeError(f"{who}: compile must be a bool, a backend name or a dict of torch.compile keywords, "
                        f"got {type(option).__name__}")
    return torch.compile(fn, **kw)
