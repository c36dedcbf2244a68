"""The error a user's bad input raises in the evaluation: one line naming the file and the fix.

Readers of images, arrays, folders and checkpoints raise `DataError` for every problem with what the user
gave (never a traceback of the library that met it), so the command line can print the message and exit.
"""
import re
from os import PathLike
from typing import Optional, Union

#: Longest part of a message copied from another library's exception (they can be kilobytes long).
_REASON_LIMIT = 240


def one_line(text: object, limit: Optional[int] = None) -> str:
    """`text` with every run of whitespace (newlines included) as one space, cut to `limit` characters."""
    s = re.sub(r"\s+", " ", str(text)).strip()
    if limit is not None and len(s) > limit:
        s = s[:limit - 3].rstrip() + "..."
    return s


def reason(exc: BaseException) -> str:
    """A short one-line description of an exception from another library: its type and first words."""
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, _REASON_LIMIT)


class DataError(ValueError):
    """A file, folder or option the user gave cannot be used as given.

    `str(err)` is one line: `<path>: <problem>; <fix>` (without the path when no file is concerned).
    """

    def __init__(self, path: Union[str, PathLike, None], problem: str, fix: str = ""):
        self.path = None if path is None else str(path)
        self.problem, self.fix = one_line(problem), one_line(fix)
        text = self.problem + (f"; {self.fix}" if self.fix else "")
        super().__init__(f"{self.path}: {text}" if self.path else text)

    def __reduce__(self):  # picklable across processes despite the three-argument constructor
        return (type(self), (self.path, self.problem, self.fix))
