"""Appends of the monitor's chunks in a background thread, so that training does not wait for the files.

An append of 128 recorded steps writes about 80 small files (each by rename, :mod:`gradlab.monitor.store`): 31 ms on
the blog MLP's store, 0.24 ms per recorded step if the training loop waited for it.  :class:`Appender` runs the
appends one at a time, in order, on one thread (file writes and the zstd encoder release the GIL), and the training
thread goes on.  The store's guarantees do not change: a chunk's files are written before the arrays' lengths, so a
process killed at any moment leaves every append that had finished, and :meth:`wait` (``monitor.flush()``, before
each checkpoint, and ``close()``) returns once every submitted append is on disk.  An append that fails is raised
again by the next :meth:`submit` or :meth:`wait`: no result is lost silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future

import numpy as np

from gradlab.monitor.worker import Worker


class Appender:
    """One background thread that runs ``append(rows)`` calls in submission order."""

    def __init__(self, append: Callable[[Mapping[str, np.ndarray]], None]) -> None:
        self._append = append
        self._worker = Worker("gradlab-monitor-append")
        self._pending: list[Future] = []

    def submit(self, rows: Mapping[str, np.ndarray]) -> None:
        """Queue an append (raises the error of an earlier one that failed)."""
        self._reap()
        self._pending.append(self._worker.submit(self._append, rows))

    def wait(self) -> None:
        """Block until every queued append is written; raise the first error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def shutdown(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown()

    def _reap(self) -> None:
        """Raise the error of a finished append (one look at each future: one that finishes meanwhile stays
        pending, never dropped)."""
        done = []
        pending = []
        for f in self._pending:
            (done if f.done() else pending).append(f)
        self._pending = pending  # the unfinished ones stay waited for even if a finished one raises below
        for f in done:
            f.result()
