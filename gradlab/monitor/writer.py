"""Appends of the monitor's chunks in a background thread, so that training does not wait for the files.

An append of 128 recorded steps writes about 80 small files (each by rename, :mod:`gradlab.monitor.store`): 31 ms on
the blog MLP's store, 0.24 ms per recorded step if the training loop waited for it.  :class:`Appender` runs the
appends one at a time, in order, on one thread (file writes and the zstd encoder release the GIL), and the training
thread goes on.  At most one chunk is in flight: a chunk is queued only once the one before it is on disk (the
training thread waits for it then, which it does only when it fills a chunk faster than the thread writes one), so
a process killed at any moment, by ``kill -9`` or ``os._exit``, loses at most that chunk and the steps buffered
since (fewer than ``2 * chunk_steps`` recorded steps), never a queue of chunks.  The store's guarantees do not
change: an append commits its chunk at once, at its end (:mod:`gradlab.monitor.store`), so a kill leaves every
append that had finished, and :meth:`wait` (``monitor.flush()``, before each checkpoint, and ``close()``) returns
once every submitted append is on disk.  An append that fails is raised again by the next :meth:`submit` or
:meth:`wait`: no result is lost silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future

import numpy as np

from gradlab.monitor.worker import Worker


class Appender:
    """One background thread that runs ``append(rows)`` calls in submission order, at most ``in_flight`` queued."""

    def __init__(self, append: Callable[[Mapping[str, np.ndarray]], None], in_flight: int = 1) -> None:
        self._append = append
        self._in_flight = max(int(in_flight), 1)
        self._worker = Worker("gradlab-monitor-append")
        self._pending: list[Future] = []

    def submit(self, rows: Mapping[str, np.ndarray]) -> None:
        """Queue an append once fewer than ``in_flight`` are unwritten (raises the error of an earlier one that
        failed)."""
        self._reap()
        while len(self._pending) >= self._in_flight:
            f = self._pending.pop(0)
            f.result()
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
