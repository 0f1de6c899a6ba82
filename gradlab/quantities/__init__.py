"""Measured quantities, one file each (:mod:`gradlab.quantities.base` has the contract), and their registry.

:data:`QUANTITIES` is the explicit registry of the probe's pluggable per-trial quantities: every quantity whose
``protocols`` include a store's protocol is computed for every trial and stored under its outputs' names; `gradlab
analyze` tabulates and draws those with ``report = True``.  Adding one: a file here, a line below, two tests
(an analytic case and a float64 brute-force reference) -- the recipe is in CONTRIBUTING.md.
"""

from __future__ import annotations

from gradlab.quantities.base import Output, TrialInputs, TrialQuantity
from gradlab.quantities.gram_moments import GramMoments

QUANTITIES: dict[str, TrialQuantity] = {
    "gram_moments": GramMoments(),
}


def quantities_for(protocol: str) -> list[TrialQuantity]:
    """The registered quantities a store of ``protocol`` computes, in registry order."""
    return [q for q in QUANTITIES.values() if protocol in q.protocols]


def output_declarations(protocol: str | None = None) -> dict[str, tuple[TrialQuantity, Output]]:
    """Output name -> (quantity, declaration), for one protocol's quantities or for all."""
    qs = quantities_for(protocol) if protocol is not None else list(QUANTITIES.values())
    return {o.name: (q, o) for q in qs for o in q.outputs}


__all__ = ["QUANTITIES", "Output", "TrialInputs", "TrialQuantity", "output_declarations", "quantities_for"]
