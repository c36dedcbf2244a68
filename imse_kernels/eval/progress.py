"""A progress bar: tqdm when it is installed (it comes with timm's huggingface_hub), else a plain one on stderr."""
import sys
import time

#: Set to False (the CLI's --no-progress) to silence every bar.
ENABLED = True


class Progress:
    """`update(n, text)` and `close()`; writes to stderr (a bar on a terminal, a line every 30 s in a log)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self._t0, self._last = total, desc, 0, time.perf_counter(), 0.0
        self._bar = None
        if not ENABLED:
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
        if not ENABLED:
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
        elif ENABLED and self.n and self._tty:
            print(file=sys.stderr)
