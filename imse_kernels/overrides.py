"""Scoped overrides (backend, route, kernel variant) that are safe across threads and async tasks.

Each override is a `contextvars.ContextVar`, so a `with` block in one thread or task never changes
what another one sees, and nesting restores the outer value on exit.
"""
import contextlib
import contextvars
from typing import Any, Iterator, Optional


class Override:
    """A named, scoped value: `with override.set(v): ...`; `override.get()` is None outside any block."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar(f"imse_kernels.{name}", default=None)

    def get(self) -> Optional[Any]:
        return self._var.get()

    @contextlib.contextmanager
    def set(self, value: Any) -> Iterator[None]:
        token = self._var.set(value)
        try:
            yield
        finally:
            self._var.reset(token)
