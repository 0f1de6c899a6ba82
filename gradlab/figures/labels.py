"""Axis labels from attrs only (the idea of ``xarray.plot.utils.label_from_attrs``)."""

from __future__ import annotations

from typing import Any


def label_from_attrs(da: Any, fallback: str = "", width: int | None = 42) -> str:
    """``long_name [units]`` from a DataArray's attrs (the name, else ``fallback``, when there is no
    ``long_name``; no unit for "1"), broken into lines of at most ``width`` characters so that a label never
    runs past its axes (None: one line)."""
    from gradlab.figures.layout import wrap_label

    attrs = getattr(da, "attrs", {}) or {}
    name = attrs.get("long_name") or attrs.get("standard_name") or getattr(da, "name", None) or fallback
    units = attrs.get("units")
    text = f"{name} [{units}]" if units and units != "1" else str(name)
    return wrap_label(text, width) if width else text
