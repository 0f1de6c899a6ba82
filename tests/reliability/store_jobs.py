"""A toy writer of a gradlab store, run in processes killed by the store property test (kept free of torch so
that each process starts fast)."""

from __future__ import annotations

import os

import numpy as np

UNITS = 6


def store_job(path: str, kill_at: int) -> None:
    """One writer process on a toy store: (re)create it, write each undone unit's two variables, mark it done,
    SIGKILL itself at operation ``kill_at`` (0: during the template's creation)."""
    import signal

    from gradlab.store import VarSpec, create_store, writer_for

    ops = [0]

    def tick() -> None:
        ops[0] += 1
        if ops[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def create() -> None:
        if kill_at == 0:
            os.environ["GRADLAB_CRASH_AT"] = "store.create"
        create_store(path, kind="toy", sizes={"unit": UNITS, "x": 5},
                     coords={"unit": ("unit", np.arange(UNITS), {})},
                     variables=[VarSpec("a", ("unit", "x"), "float64", "a", "1"),
                                VarSpec("b", ("unit",), "int64", "b", "1")],
                     unit_dims=("unit",), chunks={"unit": 1}, config={"toy": 1})

    with writer_for(path, resume=True, config={"toy": 1}, create=create) as w:
        done = w.done()
        for u in range(UNITS):
            if done[u]:
                continue
            w.write("a", {"unit": u}, np.sin(np.arange(5) + u) / 3)
            tick()
            w.write("b", {"unit": u}, u * u)
            tick()
            w.mark_done({"unit": u})
            tick()


def job_child(path: str, kill_at: int, log: str) -> None:
    import sys
    import traceback

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    try:
        store_job(path, kill_at)
        code = 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        code = 1
    sys.stderr.flush()
    os._exit(code)


