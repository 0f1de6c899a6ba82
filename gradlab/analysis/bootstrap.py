"""Bootstrap over trials (``scipy.stats.bootstrap``) for statistics of several outputs at once.

Trials are the independent units of a probe store (each trial draws its own examples with its own seed), so
every interval in gradlab resamples trials (Efron & Tibshirani 1993, "An Introduction to the Bootstrap";
BCa intervals by default).  A sample here is a 2-D array ``(features, trial)``; a statistic maps arrays of shape
``(*batch, features, trial)`` to ``(outputs, *batch)``, so one call yields intervals for every output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gradlab.analysis.interval import Estimate

MIN_TRIALS_FOR_INTERVAL = 5
FEW_TRIALS = 20

Statistic = Callable[..., np.ndarray]


@dataclass(frozen=True)
class BootstrapResult:
    """Point values, interval bounds and bootstrap standard errors of every output of a statistic."""

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    standard_error: np.ndarray
    distribution: np.ndarray | None  # (outputs, n_boot), None without a bootstrap
    level: float
    note: str | None

    def estimate(self, i: int) -> Estimate:
        """Output ``i`` as an :class:`Estimate`."""
        return Estimate(float(self.value[i]), float(self.low[i]), float(self.high[i]), self.level, self.note)


def bootstrap_trials(
    samples: Sequence[np.ndarray],
    statistic: Statistic,
    *,
    n_boot: int,
    rng: np.random.Generator,
    paired: bool = False,
    level: float = 0.95,
    method: str = "BCa",
    unit: Callable[[int], str] | None = None,
) -> BootstrapResult:
    """Bootstrap ``statistic(*samples)`` by resampling trials (the last axis of every sample).

    ``samples`` are 2-D arrays ``(features, trial)``; with ``paired`` all samples share their trials (same
    length, resampled together), otherwise each sample's trials are resampled independently.  Fewer than
    ``MIN_TRIALS_FOR_INTERVAL`` trials in a sample give NaN bounds and a note (an interval is never invented);
    fewer than ``FEW_TRIALS`` add a note that coverage may fall short of ``level``.  Warnings scipy raises on
    degenerate data (e.g. every resample equal) become a note and NaN bounds for the affected outputs.
    ``unit(n)`` words "n units" of the last axis in those notes (default "n trials"; e.g. pairs of trials).
    """
    samples = [np.asarray(s, dtype=np.float64) for s in samples]
    for s in samples:
        if s.ndim != 2:
            raise ValueError(f"bootstrap samples must be 2-D (features, trial); got shape {s.shape}")
    with np.errstate(all="ignore"):
        value = np.asarray(statistic(*samples), dtype=np.float64)
    n_out = value.shape[0]
    nan = np.full(n_out, np.nan)
    n_trials = min(s.shape[-1] for s in samples)
    count = unit or (lambda n: f"{n} trial(s)" if n < MIN_TRIALS_FOR_INTERVAL else f"{n} trials")
    if n_trials < MIN_TRIALS_FOR_INTERVAL:
        note = (f"only {count(n_trials)}: no interval (a bootstrap interval needs at least "
                f"{count(MIN_TRIALS_FOR_INTERVAL)}; run more trials)")
        return BootstrapResult(value, nan, nan.copy(), nan.copy(), None, level, note)

    def vectorised(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*[np.moveaxis(x, 0, -2) for x in xs])

    notes: list[str] = []
    if n_trials < FEW_TRIALS:
        notes.append(f"only {count(n_trials)}: interval coverage may fall short of {level:.0%}")
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        from scipy import stats

        res = stats.bootstrap(tuple(samples), vectorised, n_resamples=n_boot,
                              vectorized=True, paired=paired, axis=-1, confidence_level=level, method=method,
                              rng=rng)
    low = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=np.float64))
    high = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=np.float64))
    if caught:
        notes.append("bootstrap: " + "; ".join(sorted({_plain(str(w.message)) for w in caught})))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(n_out, -1)
    return BootstrapResult(value, low, high, np.atleast_1d(res.standard_error), dist, level,
                           "; ".join(notes) or None)


def _plain(message: str) -> str:
    """scipy's warning in the notes' words: a degenerate bootstrap distribution says what it means."""
    if "degenerate" in message or "cannot be calculated" in message:
        return ("the resampled values are all (nearly) equal, as when every trial gives the same value: no "
                "interval (the spread over trials is zero, not the uncertainty)")
    return message.split(".")[0]
