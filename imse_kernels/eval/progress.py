"""A progress bar: tqdm when it is installed (it comes with timm's huggingface_hub), else a plain one on stderr.

`with bars(False):` silences every bar created inside the block (the CLI's --no-progress, and ranks other
than 0 under torchrun); it is scoped to the block (a context variable), so nothing global changes.
"""
import contextlib
import contextvars
import sys
import time
from typing import Iterator, Optional

_ENABLED = contextvars.ContextVar("imse_eval_progress_bars", default=True)


@contextlib.contextmanager
def bars(enabled: bool) -> Iterator[None]:
    """Progress bars on or off inside the block."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


class Progress:
    """`update(n, text)` and `close()`; writes to stderr (a bar on a terminal, a line every 30 s in a log).
    `enabled` None follows the enclosing `bars(...)` block (on by default)."""

    def __init__(self, total: int, desc: str, enabled: Optional[bool] = None):
        self.total, self.desc, self.n, self._t0, self._last = total, desc, 0, time.perf_counter(), 0.0
        self._bar = None
        self.enabled = _ENABLED.get() if enabled is None else bool(enabled)
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tty = sys.stderr.isatty()
        if tqdm is not None and self._tty:
            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, text: str = "") -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if text:
                self._bar.set_postfix_str(text, refresh=False)
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last > 1.0 or self.n >= self.total:
                self._last = now
                print(f"\r{self.desc}: {self.n}/{self.total} {text}", end="", file=sys.stderr, flush=True)
        elif self.n >= self.total or now - self._last > 30.0:  # a log file: one line now and then
            self._last = now
            print(f"{self.desc}: {self.n}/{self.total} ({now - self._t0:.0f} s) {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n and self._tty:
            print(file=sys.stderr)


class Log:
    """Status lines on stderr; `quiet` (ranks other than 0 under torchrun) drops them."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)
