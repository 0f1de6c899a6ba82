"""A fast monitored training loop that ends in one of several ways, for the exit tests of the monitor store.

python exit_script.py OUT STEPS MODE AT CHUNK

MODE: ``os_exit`` (``os._exit(0)`` right after step AT: no Python cleanup, as ``kill -9``), ``interrupt``
(``KeyboardInterrupt`` raised after step AT, uncaught), ``return`` (the loop ends without ``close()``),
``close`` (the loop ends with ``close()``: the reference).  The monitor is flushed after step 5.  Prints
nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from gradlab.monitor import NoiseMonitor


def main(argv: list[str]) -> None:
    out, steps, mode, at, chunk = Path(argv[0]), int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g))
            for _ in range(16)]
    mon = NoiseMonitor(model, "cross-entropy", out, optimizer=opt, chunk_steps=chunk)
    for step in range(steps):
        opt.zero_grad()
        mon.loss(data[step % 16]).backward()
        opt.step()
        if step == 5:
            mon.flush()  # a partial chunk: the next append rewrites it (also at exit)
        if step == at and mode == "os_exit":
            os._exit(0)
        if step == at and mode == "interrupt":
            raise KeyboardInterrupt
    if mode == "close":
        mon.close()


if __name__ == "__main__":
    main(sys.argv[1:])
