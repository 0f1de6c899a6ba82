"""The monitor's background worker: a recorded step's arithmetic on a second thread while training goes on.

What runs there (``NoiseMonitor(background=...)``; default: on when the parameters are on the CPU, torch's
intra-op threads leave a core of this process free, and ``optimizer=`` is given): the per-example norms from the
captured layer inputs and output gradients (:meth:`gradlab.monitor.norms.PerExampleNorms.compute`: the Gram
products of sequence models, a fifth of a GPT's step), S₁ and Q (:func:`gradlab.monitor.sums.step_sums`), and the
update norm and distance from init (:mod:`gradlab.monitor.distances`).  What stays on the training thread:
everything that decides (which modules are batched, the loss-terms check of the first recorded step, the notes),
the torch.func fallback (it re-runs the model at θ_t), and the rows' bookkeeping.

Why the numbers do not change: the worker runs the same torch operations, in the same order, at the same intra-op
thread count (a new thread inherits torch's), so the store is the same bit for bit (``tests/monitor/
test_background.py``).  Why the reads are safe: the worker reads θ (distances) and the tensors a step captured; the
next optimizer step's pre-hook waits for the worker before it changes θ, and whether any tensor the worker read
was changed in place meanwhile (the training loop editing a parameter, or refilling an input buffer, between steps)
is checked by the tensors' version counters and storages: such a step loses the numbers that depend on the changed
tensors (NaN norms, or ``missing`` 7), with a note, and the worker is switched off for the rest of the run.
Edits through ``.data`` bypass the version counter and are not seen: pass ``background=False`` to a loop that does
that between steps.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor


def spare_core() -> bool:
    """Whether torch's intra-op threads leave a core of this process's CPUs free."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


def marks(tensors: Iterable[Tensor]) -> list[tuple[Any, int, int]]:
    """Weak references to tensors that stay alive (parameters, optimizer buffers) with their storage and version."""
    return [(weakref.ref(t), t.data_ptr(), t._version) for t in tensors]


def input_marks(tensors: Iterable[Tensor]) -> list[tuple[Any, int, int]]:
    """The same for the layer inputs a job reads that the user's code can reach: those not computed by autograd in
    the forward (the batch itself, features computed without gradients).  They are held until the check, so
    that a buffer edited in place and then dropped is still seen; the forward's own activations are not held."""
    return [((lambda t=t: t), t.data_ptr(), t._version) for t in tensors if t.grad_fn is None]


def unchanged(saved: list[tuple[Any, int, int]]) -> bool:
    """Whether no tensor of :func:`marks` was changed in place or given another storage since (a tensor freed since
    cannot have been edited while the job ran: it was held by the job)."""
    for ref, ptr, version in saved:
        t = ref()
        if t is not None and (t.data_ptr() != ptr or t._version != version):
            return False
    return True


class Worker:
    """One thread, started at the first job, running jobs in submission order (a job may read the results of
    earlier ones); also the thread of the store's appends (:class:`gradlab.monitor.writer.Appender`)."""

    def __init__(self, name: str = "gradlab-monitor-worker") -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; at interpreter exit (the monitor's ``atexit`` close, after Python has joined its
        pool threads and refuses new jobs: our own :meth:`shutdown` drops the pool, so a refusal means that) it
        runs here, at once, and the returned future is already done."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        try:
            return self._pool.submit(fn, *args)
        except RuntimeError as exc:
            if "cannot schedule new futures" not in str(exc):
                raise
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, as the pool would
            done.set_exception(exc)
        return done

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
