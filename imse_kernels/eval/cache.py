"""Where the evaluation keeps what it builds once (the trained embedded model)."""
import os
from pathlib import Path
from typing import Optional

#: Environment variable that overrides the cache directory.
CACHE_ENV = "IMSE_KERNELS_CACHE"


def cache_dir(override: Optional[str] = None) -> Path:
    """`override`, else $IMSE_KERNELS_CACHE, else $XDG_CACHE_HOME/imse_kernels, else ~/.cache/imse_kernels."""
    if override:
        path = Path(override)
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "imse_kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path
