"""Layout checks and helpers for figures fit for a paper: no overlapping text, labels that fit their axes.

:func:`overlapping_text` draws the figure and compares the window extents (matplotlib's tight bounding boxes) of
every visible text artist -- titles, axis labels, tick labels, legend entries, annotations -- and reports pairs
that overlap or text that leaves the figure.  The analysis runs it on every figure it saves (``render``), and the
tests assert it finds nothing.
"""

from __future__ import annotations

import textwrap
from typing import Any


def wrap_label(text: str, width: int = 40) -> str:
    """``text`` broken into lines of at most ``width`` characters (axis labels longer than their axes)."""
    return "\n".join(textwrap.wrap(text, width)) if len(text) > width else text


def _texts(fig: Any) -> list[Any]:
    """Visible texts that are drawn: tick labels only of the ticks inside the view limits (matplotlib keeps stale
    label objects for the others)."""
    from matplotlib.axis import Axis
    from matplotlib.text import Text

    tick_labels, drawn = set(), []
    for axis in fig.findobj(Axis):
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            tick_labels.update({id(tick.label1), id(tick.label2)})
        if not axis.get_visible() or not axis.axes.axison:
            continue
        for tick in axis._update_ticks():  # the ticks the next draw will show
            drawn += [lab for lab in (tick.label1, tick.label2) if lab.get_visible()]
    out = [t for t in fig.findobj(Text) if id(t) not in tick_labels] + drawn
    return [t for t in out if t.get_visible() and t.get_text().strip() and t.get_alpha() != 0]


def overlapping_text(fig: Any, tol: float = 0.5) -> list[str]:
    """Descriptions of overlapping visible texts and of texts outside the figure (empty: the layout is clean).

    ``tol`` pixels of overlap are forgiven (anti-aliasing).  Tick labels of one axis are compared too, so
    crowded ticks count."""
    if not hasattr(fig.canvas, "get_renderer"):  # a bare Figure: give it an Agg canvas (no pyplot state)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig)
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    fb = fig.bbox
    problems = []
    for t, b in boxes:
        if b.x0 < fb.x0 - tol or b.y0 < fb.y0 - tol or b.x1 > fb.x1 + tol or b.y1 > fb.y1 + tol:
            problems.append(f"text {t.get_text()!r} leaves the figure")
    for i, (t1, b1) in enumerate(boxes):
        for t2, b2 in boxes[i + 1:]:
            w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
            h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
            if w > tol and h > tol:
                problems.append(f"texts {t1.get_text()!r} and {t2.get_text()!r} overlap")
    return problems


def note_if_empty(ax: Any, reason: str) -> bool:
    """Write ``reason`` in the middle of an Axes that has nothing drawn; returns whether it was empty."""
    if ax.has_data():
        return False
    ax.text(0.5, 0.5, wrap_label(reason, 38), ha="center", va="center", transform=ax.transAxes, fontsize=8,
            color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
    return True


def readable_log_ticks(ax: Any, which: str = "xy") -> None:
    """Plain-number major ticks on the base-10 log axes of ``ax`` (``which``: "x", "y" or both), from the current
    view limits: 1-2-5 steps on an axis spanning under 1.5 decades, 1-3 under 3, decades beyond; minor ticks
    unlabelled.  (matplotlib labels the minor ticks of a short log axis 2×10⁰, 3×10⁰, ..., which crowd and
    overlap.)  An axis inside [0.001, 100000) reads in plain decimals, any other in powers of ten.  Call after
    the data are drawn."""
    import math

    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter

    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        if axis.get_scale() != "log" or getattr(axis.get_transform(), "base", 10) != 10:
            continue
        lo, hi = sorted(float(v) for v in (ax.get_xlim() if name == "x" else ax.get_ylim()))  # autoscaled
        if not (lo > 0 and hi > lo and math.isfinite(hi)):
            continue
        decades = math.log10(hi / lo)
        subs = (1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 3 else (1.0,)
        locator: Any = LogLocator(base=10, subs=subs, numticks=12)
        if sum(lo <= t <= hi for t in locator.tick_values(lo, hi)) < 2:  # a fraction of a decade
            locator = MaxNLocator(nbins=4)
        axis.set_major_locator(locator)
        if 1e-3 <= lo and hi < 1e5:  # one style per axis: plain decimals, else powers of ten throughout
            axis.set_major_formatter(FuncFormatter(lambda v, pos: f"{v:g}"))
        else:
            axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        axis.set_minor_formatter(NullFormatter())
