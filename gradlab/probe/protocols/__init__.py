"""The two probe protocols, one module each, behind one contract: ``compute(config, c, idx, pool, out, tick)`` fills
a unit's output arrays (``out``, shaped as the unit's store regions) for the trials whose example draws are the rows
of ``idx`` at checkpoint ``c``, calling ``tick(n)`` as n (trial, batch size) pairs complete (len(idx)·|m| in all:
the progress bar).  An explicit registry: protocol name -> module."""

from __future__ import annotations

import importlib
from typing import Any

PROTOCOLS: dict[str, str] = {
    "step": "gradlab.probe.protocols.step",
    "frozen": "gradlab.probe.protocols.frozen",
}


def protocol(name: str) -> Any:
    """The module of protocol ``name`` (its ``compute`` function)."""
    return importlib.import_module(PROTOCOLS[name])
