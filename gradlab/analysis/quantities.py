"""The analysis of the registered per-trial quantities (:data:`gradlab.quantities.QUANTITIES`) a probe store holds.

For every stored output of a quantity with ``report = True``: its mean, standard deviation (ddof = 1) and number
of finished trials over trials, per checkpoint (and per batch size and any other dim it declares), labelled from
the store's attrs (which come from the quantity's declaration).  Outputs with one value per (checkpoint, batch
size) or per checkpoint are also tabulated in ``summary.json`` (key ``quantities``) and the report, and those
with a ``batch_size`` dim get a figure (:func:`gradlab.figures.quantities.plot_quantity`).  Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def reported_outputs(ds: Any) -> list[tuple[Any, Any]]:
    """(quantity, output declaration) of every registered output in ``ds`` that the analysis reports."""
    from gradlab.quantities import output_declarations

    return [(q, o) for name, (q, o) in output_declarations().items() if q.report and name in ds.data_vars]


def quantity_statistics(ds: Any, done: Any) -> Any:
    """An xarray Dataset of ``{name}_mean``, ``{name}_std`` and ``{name}_n`` over finished trials, for every reported
    output (empty when the store holds none)."""
    import xarray as xr

    out = xr.Dataset()
    for _, o in reported_outputs(ds):
        da = ds[o.name].where(done)
        n = da.notnull().sum("trial")
        mean = da.sum("trial", skipna=True) / n.where(n > 0)
        std = np.sqrt(((da - mean) ** 2).sum("trial", skipna=True) / (n - 1).where(n > 1))
        name, units = ds[o.name].attrs.get("long_name", o.name), ds[o.name].attrs.get("units", "1")
        out[f"{o.name}_mean"] = mean.assign_attrs(long_name=f"mean over trials of {name}", units=units)
        out[f"{o.name}_std"] = std.assign_attrs(long_name=f"standard deviation over trials of {name}", units=units)
        out[f"{o.name}_n"] = n.assign_attrs(long_name=f"finished trials of {name}", units="1")
    return out


def quantity_summary(stats: Any, labels: list[str]) -> dict[str, Any]:
    """``summary.json``'s ``quantities``: per output, its long name, units and, per checkpoint (and batch size),
    mean, std and n -- for outputs with no dims besides checkpoint and batch size."""
    from gradlab.analysis.interval import json_float

    out: dict[str, Any] = {}
    for var in stats.data_vars:
        if not var.endswith("_mean"):
            continue
        name = var.removesuffix("_mean")
        mean, std, n = stats[var], stats[f"{name}_std"], stats[f"{name}_n"]
        if set(mean.dims) - {"checkpoint", "batch_size"}:
            continue
        entry: dict[str, Any] = {"long_name": mean.attrs["long_name"].removeprefix("mean over trials of "),
                                 "units": mean.attrs.get("units", "1"), "checkpoints": {}}
        for ci, c in enumerate(labels):
            sel = {"checkpoint": ci}
            if "batch_size" in mean.dims:
                entry["checkpoints"][c] = {
                    str(int(m)): {"mean": json_float(mean.isel(sel).sel(batch_size=m).item()),
                                  "std": json_float(std.isel(sel).sel(batch_size=m).item()),
                                  "n": int(n.isel(sel).sel(batch_size=m).item())}
                    for m in mean["batch_size"].values}
            else:
                entry["checkpoints"][c] = {"mean": json_float(mean.isel(sel).item()),
                                           "std": json_float(std.isel(sel).item()), "n": int(n.isel(sel).item())}
        out[name] = entry
    return out


def quantity_captions() -> dict[str, str]:
    """Figure stem -> caption, from each reported quantity's own ``caption``."""
    from gradlab.quantities import QUANTITIES

    how = (" Mean over finished trials (markers) ± one standard deviation (error bars) against batch size m "
           "(log x axis), one colour per checkpoint.")
    return {f"quantity_{o.name}": (q.caption + how).strip() for q in QUANTITIES.values() if q.report
            for o in q.outputs}


def add_quantities(ds: Any, done: Any, ads: Any, result: dict[str, Any], labels: list[str]) -> Any:
    """The analysis group ``ads`` with the registered quantities' statistics merged in, and ``result`` with their
    ``quantities`` summary (unchanged when the store holds none)."""
    stats = quantity_statistics(ds, done).compute()
    if not stats.data_vars:
        return ads
    result["quantities"] = quantity_summary(stats, labels)
    return ads.merge(stats.assign_coords(checkpoint=ads["checkpoint"].values), compat="override", join="override")
