"""An estimate with its confidence interval and, where no interval can be given, the reason why."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A point estimate ``value`` with a ``level`` confidence interval [``low``, ``high``].

    ``low``/``high`` are NaN when no interval can be given (too few trials, degenerate data); ``note`` then says
    why.  Infinite bounds are allowed (e.g. a crossover batch size whose upper bound is beyond any batch size).
    """

    value: float
    low: float = math.nan
    high: float = math.nan
    level: float = 0.95
    note: str | None = None

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in the closed interval (False when there is no interval)."""
        return self.has_interval and self.low <= x <= self.high

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: NaN becomes ``None``, infinities become the strings ``"inf"``/``"-inf"``."""
        return {"value": json_float(self.value), "low": json_float(self.low), "high": json_float(self.high),
                "level": self.level, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        """Inverse of :meth:`to_dict` (as found in ``summary.json``)."""
        def g(x: Any) -> float:
            return math.nan if x is None else float(x)
        return cls(g(d.get("value")), g(d.get("low")), g(d.get("high")), float(d.get("level", 0.95)), d.get("note"))

    def format(self, digits: int = 3) -> str:
        """``value [low, high]`` with ``digits`` significant digits (``[no interval]`` when there is none)."""
        def f(x: float) -> str:
            return "nan" if math.isnan(x) else ("inf" if x == math.inf else f"{x:.{digits}g}")
        ci = f"[{f(self.low)}, {f(self.high)}]" if self.has_interval else "[no interval]"
        return f"{f(self.value)} {ci}"


def format_estimate(d: dict[str, Any] | None, digits: int = 3) -> str:
    """``value [low, high]`` of a summary.json estimate dict, with its note when it has no interval."""
    if d is None:
        return "n/a"
    e = Estimate.from_dict(d)
    return e.format(digits) + (f" ({e.note})" if e.note and not e.has_interval else "")


def json_float(x: float) -> float | str | None:
    """A float for JSON: NaN -> None, ±inf -> "inf"/"-inf" (strict JSON has neither)."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def reciprocal(inv: Estimate, note_if_unbounded: str) -> Estimate:
    """The estimate of 1/x from an estimate of x ≥ 0 (e.g. B_noise from ‖G‖²/tr Σ, the crossover from b/a).

    Bootstrapping the reciprocal keeps the statistic finite when the denominator's interval reaches zero; a
    percentile-type interval maps through the monotone map 1/x, and an interval reaching x ≤ 0 becomes an
    unbounded upper end (``inf``).
    """
    def r(x: float) -> float:
        return math.inf if x <= 0 else 1.0 / x

    value = r(inv.value)
    if not inv.has_interval:
        return Estimate(value, level=inv.level, note=inv.note)
    low, high = r(inv.high), r(inv.low)
    note = inv.note
    if inv.low <= 0:
        note = "; ".join(n for n in (note, note_if_unbounded) if n)
    return Estimate(value, low, high, inv.level, note)


def floor_interval(e: Estimate, rel: float, what: str = "the store's floating-point resolution") -> Estimate:
    """``e`` with its interval widened to at least value·(1 ± rel): no interval is narrower than the precision
    the numbers were computed with (a zero-variance point, e.g. m = N with the whole pool drawn, would otherwise
    give a zero-width interval that excludes the float64 truth)."""
    if rel <= 0 or not e.has_interval or not math.isfinite(e.value):
        return e
    half = rel * abs(e.value)
    low, high = min(e.low, e.value - half), max(e.high, e.value + half)
    if low == e.low and high == e.high:
        return e
    note = "; ".join(n for n in (e.note, f"interval widened to {what} (±{rel:.1g} relative)") if n)
    return Estimate(e.value, low, high, e.level, note)
