"""Axis labels from attrs only (the idea of ``xarray.plot.utils.label_from_attrs``)."""

from __future__ import annotations

from typing import Any


def label_from_attrs(da: Any, fallback: str = "") -> str:
    """``long_name [units]`` from a DataArray's attrs (the name, else ``fallback``, when there is no
    ``long_name``; no unit for "1")."""
    attrs = getattr(da, "attrs", {}) or {}
    name = attrs.get("long_name") or attrs.get("standard_name") or getattr(da, "name", None) or fallback
    units = attrs.get("units")
    return f"{name} [{units}]" if units and units != "1" else str(name)
