"""The torch thread count a unit runs with (results of CPU reductions depend on it in their last bits)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads (None: leave as is), restoring the count afterwards.

    CPU reductions split their work by thread count (so do some BLAS kernels), which changes the last bits of
    float results: a unit computed with another count can differ by an ulp, and a histogram bin count by an entry
    that flips bins.  Every unit of a store therefore runs with the thread count recorded in the store
    (``torch_threads``), on the driver and on Dask workers (whose environment sets one thread)."""
    import torch

    old = torch.get_num_threads()
    change = n is not None and int(n) != old
    if change:
        torch.set_num_threads(int(n))  # type: ignore[arg-type]
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(old)


def default_threads(workers: int | None = None) -> int:
    """The thread count a new store records: the driver's torch count, or, for a local cluster of ``workers``
    processes, the cores each worker gets (so that N workers do not start N × cores threads on N × ... cores)."""
    import torch

    n = int(torch.get_num_threads())
    if workers:
        n = max(1, min(n, (os.cpu_count() or 1) // int(workers)))
    return n
