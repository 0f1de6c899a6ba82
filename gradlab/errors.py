"""Errors gradlab raises for bad input, for failing user code, and for a hostile environment.

``UsageError`` is the exception the CLI turns into a one-line message and exit code 2.  Its message must say
what was wrong, what was expected and how to fix it.  ``UserCodeError`` (a ``UsageError``) carries an exception
raised inside the user's own factory: its one line names the user's frames only (``file:line in function``,
innermost first).  ``EnvironmentProblem``
is a one-line environment failure (permission, read-only filesystem, full disk, missing file): exit code 1.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


class UsageError(Exception):
    """Bad user input (flags, files, configs).  The CLI prints ``gradlab: error: <message>`` and exits 2."""


class StoreError(UsageError):
    """A store that is missing, foreign, locked by another writer, or was made with a different config."""


class EnvironmentProblem(Exception):
    """The environment refused an operation (permission, read-only, disk full, missing file): CLI exit 1."""


_GRADLAB_DIR = str(Path(__file__).resolve().parent) + os.sep
_SYSTEM_DIRS = tuple({str(Path(p).resolve()) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def user_frames(tb: object, keep_file: str | None = None) -> list[traceback.FrameSummary]:
    """The frames of a traceback that belong to the user: not gradlab's, not Python's or installed packages'
    (``keep_file``, the user module's own file, is always kept even when installed)."""
    frames = []
    for fs in traceback.extract_tb(tb):  # type: ignore[arg-type]
        f = str(Path(fs.filename).resolve()) if fs.filename and not fs.filename.startswith("<") else fs.filename
        if keep_file is not None and f == keep_file:
            frames.append(fs)
        elif f.startswith(_GRADLAB_DIR) or f.startswith(_SYSTEM_DIRS) or fs.filename.startswith("<frozen"):
            continue
        else:
            frames.append(fs)
    return frames


class UserCodeError(UsageError):
    """An exception raised inside the user's own code (a ``--model``/``--data`` factory or a loss).

    ``str(err)`` is one line naming the code and the exception; ``user_traceback`` holds the user's frames only
    (formatted; it survives pickling, e.g. from a Dask worker)."""

    def __init__(self, message: str, user_traceback: str = "") -> None:
        super().__init__(message)
        self.user_traceback = user_traceback

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.user_traceback))

    @classmethod
    def from_exception(cls, exc: BaseException, what: str, spec: str, keep_file: str | None = None) -> UserCodeError:
        frames = user_frames(exc.__traceback__, keep_file)
        text = "".join(traceback.format_list(frames))
        first = (str(exc).strip().splitlines() or [""])[0]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames))
        return cls(f"your {what} {spec!r} raised {type(exc).__name__}: {first}"
                   + (f" (at {where})" if where else "") + "; fix it and rerun (--debug shows the full traceback)",
                   text)
