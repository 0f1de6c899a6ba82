"""Figures readable as drawn: no crowded or overlapping tick labels, legends off the data, no "loss [loss]".

Each test failed on the old figure code: the monitor's top axis (examples seen) piled ticks at the right edge
(np.interp clamps beyond the last step) and read 120000 over 140000; a short log axis labelled its minor ticks
2×10⁰, 3×10⁰, ...; the weights legend sat on the bars; the interpolation's axis read "loss [loss]"."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as _Figure

from gradlab.figures.layout import overlapping_text


def Figure(**kw):  # noqa: N802 - a Figure with an Agg canvas (draws, measures text)
    fig = _Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _monitor_ds(n: int = 2000, batch: int = 64) -> xr.Dataset:
    steps = np.arange(n)
    rng = np.random.default_rng(0)
    groups = ["all", "weight", "bias"]
    scale = np.array([2.5, 2.0, 0.6])[:, None]  # tr Σ: under one decade apart
    tr = scale * (1 + 0.05 * rng.standard_normal((3, n)))
    b = np.geomspace(10, 1000, n)[None] * np.ones((3, 1))
    def var(v, long, units):
        return (("group", "step"), v, {"long_name": long, "units": units})
    return xr.Dataset(
        {"trace_cov_ema": var(tr, "tr Σ, moving average", "loss²"),
         "trace_cov_ema_low": var(0.9 * tr, "lower", "loss²"), "trace_cov_ema_high": var(1.1 * tr, "upper", "loss²"),
         "b_noise": var(b, "B_noise", "examples"), "b_noise_low": var(0.5 * b, "lower", "examples"),
         "b_noise_high": var(2 * b, "upper", "examples")},
        coords={"step": ("step", steps, {"long_name": "optimizer step t", "units": "steps"}),
                "examples_seen": ("step", batch * (steps + 1), {"long_name": "examples seen", "units": "examples"}),
                "group": ("group", groups)})


def _tick_texts(fig, ax) -> list[str]:
    fig.canvas.draw()
    out = []
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        out += [t.label1.get_text() for t in axis.get_major_ticks() + axis.get_minor_ticks()
                if t.label1.get_visible() and lo <= t.get_loc() <= hi]
    return [t for t in out if t]


@pytest.mark.parametrize("name", ["trace_cov_ema", "b_noise"])
def test_monitor_panels_have_no_overlapping_ticks_and_plain_log_labels(name):
    from gradlab.figures.monitor import plot_series

    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.subplots()
    plot_series(_monitor_ds(), ax, name)
    assert overlapping_text(fig) == []  # the top axis (examples seen) too
    (top,) = ax.child_axes  # the secondary axis
    fig.canvas.draw()
    lo, hi = top.get_xlim()
    labels = [t.label2.get_text() for t in top.xaxis.get_major_ticks()
              if t.label2.get_visible() and lo <= t.get_loc() <= hi and t.label2.get_text()]
    assert 3 <= len(labels) <= 7, labels
    assert not any("times" in t for t in _tick_texts(fig, ax)), _tick_texts(fig, ax)  # no 2×10⁰


def test_weights_legend_is_off_the_bars():
    from gradlab.figures.weights import plot_per_layer

    da = xr.DataArray(np.array([[3.3, 3.4, 3.2], [3.4, 3.3, 3.4]]), dims=("checkpoint", "layer"),  # no empty corner
                      coords={"checkpoint": ["early", "late"], "layer": ["a.weight", "a.bias", "b.weight"]},
                      attrs={"long_name": "distance from init", "units": "1"})
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    plot_per_layer(da, ax)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(r)
    for bar in ax.patches:
        b = bar.get_window_extent(r)
        if b.width > 0 and b.height > 0:
            assert not legend.overlaps(b), (legend, b)
    assert overlapping_text(fig) == []


def test_interpolation_loss_axis_does_not_repeat_its_unit():
    from gradlab.figures.curvature import plot_interpolation

    alpha = np.linspace(-1, 2, 7)
    ds = xr.Dataset({f"interp_{s}_{q}": (("alpha",), np.linspace(0.1, 1, 7), {"long_name": f"{s} {q}", "units": u})
                     for s in ("train", "test") for q, u in (("loss", "loss"), ("accuracy", "1"))},
                    coords={"alpha": ("alpha", alpha, {"long_name": "alpha", "units": "1"})})
    fig = Figure()
    ax = fig.subplots()
    plot_interpolation(ds, ax)
    assert ax.get_ylabel() == "loss"
    ds["interp_train_loss"].attrs["units"] = "nats"
    ax2 = Figure().subplots()
    plot_interpolation(ds, ax2)
    assert ax2.get_ylabel() == "loss [nats]"
