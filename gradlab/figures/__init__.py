"""Plots of analysed stores (matplotlib + seaborn, no pyplot state): each function takes data and an Axes and
returns the Axes; axis labels come only from the data's attrs (``long_name`` and ``units``, as xarray's
``label_from_attrs``).  Saving files is the job of the analyze orchestration (``gradlab.analysis.render``).

Modules: ``labels`` (attrs → label), ``norms`` (norm vs batch size with fits, normalised std, ridge plots),
``tails`` (entry histograms on log counts, tail indices), ``weights`` (distance and cosine to init per layer),
``report`` (the one-page HTML report).
"""
