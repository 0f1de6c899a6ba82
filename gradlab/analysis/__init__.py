"""Statistics, law fits with intervals, and the ``analysis`` group of probe stores (xarray side, no torch).

Data flow: ``stats`` (lazy, chunked per-batch-size moments and histograms of a probe store) ->
``noise_model`` (McCandlish et al. 2018 by weighted least squares), ``power_law`` (‖·‖ ∝ m^β, the √m range,
the crossover), ``tails`` (binned Hill and the α-stable estimator of Mohammadi et al. 2015 used by Simsekli
et al. 2019), ``compare`` (early vs late) -> ``run`` (open a store, compute, write ``analysis`` and
``summary.json``).  Every interval is a bootstrap over trials (``bootstrap``) and every estimate an
:class:`~gradlab.analysis.interval.Estimate`.

Importing this package imports numpy only; xarray, dask and scipy are imported by the modules that use them.
"""

from __future__ import annotations

from gradlab.analysis.interval import Estimate

__all__ = ["Estimate"]
