"""Early-vs-late changes with bootstrap intervals, e.g. "b_noise grew ×3.1 [2.6, 3.7]".

A change is the ratio late/early (scales such as B_noise, ‖G‖², tr Σ) or the difference late − early
(exponents such as β) of a statistic computed at two checkpoints.  Its interval resamples trials: jointly when
the two checkpoints used the same draws of examples in every trial (a paired design: ``example_index`` equal),
independently otherwise (Efron & Tibshirani 1993, §8 two-sample bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab.analysis.bootstrap import bootstrap_trials
from gradlab.analysis.interval import Estimate, json_float


@dataclass(frozen=True)
class Change:
    """``late`` vs ``early`` of one quantity: ``kind`` is ``ratio`` (late/early) or ``difference`` (late − early)."""

    quantity: str
    kind: str
    early_label: str
    late_label: str
    early: float
    late: float
    change: Estimate
    paired: bool

    def describe(self) -> str:
        """One line such as ``b_noise grew ×3.1 [2.6, 3.7] (early → late)``."""
        e = self.change
        null = 1.0 if self.kind == "ratio" else 0.0
        if e.low is not None and e.high is not None and np.isfinite(e.low) and np.isfinite(e.high) \
                and e.low <= null <= e.high:  # the interval holds "no change": no direction is claimed
            body = f"×{e.format(2)}" if self.kind == "ratio" else f"{e.format(2)}"
            return (f"{self.quantity}: no change distinguishable at {e.level:.0%} "
                    f"({'ratio' if self.kind == 'ratio' else 'difference'} {body}, {self.early_label} → "
                    f"{self.late_label})")
        if self.kind == "ratio":
            verb = "grew" if e.value > 1 else "shrank"
            body = f"×{e.format(2)}"
        else:  # "fell by 0.096 [0.05, 0.14]", never "fell by −0.096"
            verb = "rose" if e.value > 0 else "fell"
            mag = e if e.value > 0 else Estimate(-e.value, -e.high, -e.low, e.level, e.note)
            body = f"by {mag.format(2)}"
        return f"{self.quantity} {verb} {body} ({self.early_label} → {self.late_label})"

    def to_dict(self) -> dict[str, Any]:
        return {"quantity": self.quantity, "kind": self.kind, "early": json_float(self.early),
                "late": json_float(self.late), "change": self.change.to_dict(), "paired": self.paired,
                "text": self.describe()}


def compare_checkpoints(
    early: np.ndarray,
    late: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    names: Sequence[str],
    kinds: Sequence[str],
    *,
    labels: tuple[str, str] = ("early", "late"),
    paired: bool = False,
    n_boot: int = 999,
    rng: np.random.Generator,
    level: float = 0.95,
) -> list[Change]:
    """Changes of every output of ``statistic`` (features, trial) → (outputs, ...) between two checkpoints."""
    if len(names) != len(kinds) or any(k not in ("ratio", "difference") for k in kinds):
        raise ValueError("names and kinds must match; kinds are 'ratio' or 'difference'")
    ratio = np.array([k == "ratio" for k in kinds])

    def stat(e: np.ndarray, la: np.ndarray) -> np.ndarray:
        se, sl = statistic(e), statistic(la)
        r = ratio.reshape(-1, *([1] * (se.ndim - 1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(r, sl / se, sl - se)

    if paired and early.shape[-1] != late.shape[-1]:
        paired = False
    with np.errstate(all="ignore"):
        e_val, l_val = statistic(np.asarray(early, float)), statistic(np.asarray(late, float))
    if n_boot > 0:
        res = bootstrap_trials([early, late], stat, n_boot=n_boot, rng=rng, paired=paired, level=level)
        ests = [res.estimate(i) for i in range(len(names))]
    else:
        ests = [Estimate(float(v)) for v in stat(np.asarray(early, float), np.asarray(late, float))]
    return [Change(n, k, labels[0], labels[1], float(e_val[i]), float(l_val[i]), ests[i], paired)
            for i, (n, k) in enumerate(zip(names, kinds, strict=True))]


def same_draws(example_index: np.ndarray) -> bool:
    """Whether two checkpoints' trials drew the same examples: ``example_index`` (2, trial, example) equal."""
    a = np.asarray(example_index)
    return bool(a.shape[0] == 2 and np.array_equal(a[0], a[1]) and not math.isnan(float(a.sum())))
