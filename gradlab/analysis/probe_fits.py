"""Fits of one checkpoint of a probe store: power laws, the noise model, and tail indices per batch size.

Pure numpy inputs (the small per-trial arrays the lazy reductions of ``stats`` produce), so the same code serves
stores, synthetic data and tests.  Seeds: every estimator draws from ``SeedSequence([seed, checkpoint, code])``
(``code`` fixed per estimator and batch size), so results do not depend on the order of the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradlab.analysis.interval import floor_interval
from gradlab.analysis.noise_model import NoiseModelFit, finite_population_factor, fit_noise_model
from gradlab.analysis.power_law import PowerLawFit, fit_power_law
from gradlab.analysis.tails import TailFit

SEED_CODES = {"power_grad_norm": 1, "power_rms": 2, "noise_model": 3, "hill": 100, "alpha_stable": 200,
              "compare": 300, "moments": 400, "alpha_stable_layer": 10_000}


_S_FIXED = ("the frozen protocol's S = c_m·Σᵢgᵢ sums the same N examples at the same θ for every m (c_m = 1/m under "
            "mean reduction, 1 under sum), so ‖S‖ ∝ m^−1 or m^0 by construction")
NOT_MEASURED_FROZEN = {
    "power law, crossover and histograms of ‖S‖": _S_FIXED + "; the RMS of ‖s_B‖ carries the batch-size dependence",
    "normalised std of ‖S‖": _S_FIXED + "; its normalised spread is the same for every m",
    "lack of fit of the noise model": "at a fixed θ the noise model is an identity of sampling from the pool, so "
                                      "its lack-of-fit test cannot fail",
    "tail indices per batch size": "S only rescales with m, so the tail index of its entries is the same for "
                                   "every m: it is estimated once, at the reference batch size",
}


def rng_for(seed: int, checkpoint: int, code: int) -> np.random.Generator:
    """The generator of one estimator at one checkpoint: ``SeedSequence([seed, checkpoint, code])``."""
    return np.random.default_rng(np.random.SeedSequence([seed, checkpoint, code]))


@dataclass(frozen=True)
class CheckpointFits:
    """Everything fitted at one checkpoint."""

    label: str
    n_trials: int
    power_laws: dict[str, PowerLawFit]
    noise_model: NoiseModelFit | None
    tails: dict[int, TailFit] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "n_trials": self.n_trials,
                "power_law": {k: v.to_dict() for k, v in self.power_laws.items()},
                "noise_model": self.noise_model.to_dict() if self.noise_model else None,
                "tails": {str(m): t.to_dict() for m, t in self.tails.items()}}


def fit_checkpoint(
    label: str,
    index: int,
    batch_sizes: np.ndarray,
    grad_norm: np.ndarray,
    q: np.ndarray | None,
    *,
    pool_size: int | None,
    replacement: bool,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    resolution: float = 0.0,
) -> CheckpointFits:
    """Power law of ‖S‖ (``grad_norm`` (batch_size, trial)) for step stores; with ``q`` (frozen stores: per-trial
    mean ‖g_B‖²) instead the noise model (no lack-of-fit test) and the power law of the RMS of ‖s_B‖ (q·m² is the
    per-trial mean of ‖s_B‖²).  A frozen store's ‖S‖ = c_m‖Σᵢgᵢ‖ has β fixed by the reduction (−1 or 0): it is
    not fitted (see :data:`NOT_MEASURED_FROZEN`)."""
    m = np.asarray(batch_sizes, dtype=np.float64)
    laws = {}
    if q is None:
        laws["grad_norm"] = fit_power_law(grad_norm, m, kind="mean", quantity="grad_norm", n_boot=n_boot,
                                          rng=rng_for(seed, index, SEED_CODES["power_grad_norm"]), level=level)
    noise = None
    if q is not None:
        laws["minibatch_sum_rms"] = fit_power_law(q * m[:, None] ** 2, m, kind="rms", quantity="minibatch_sum_rms",
                                                  n_boot=n_boot, rng=rng_for(seed, index, SEED_CODES["power_rms"]),
                                                  level=level,
                                                  factor=finite_population_factor(m, pool_size, replacement))
        noise = fit_noise_model(q, m, pool_size=pool_size, replacement=replacement, n_boot=n_boot,
                                rng=rng_for(seed, index, SEED_CODES["noise_model"]), level=level, lack_of_fit=False)
    if resolution > 0:  # no interval narrower than the numbers' own precision
        laws = {k: replace(v, beta=floor_interval(v.beta, resolution),
                           crossover=floor_interval(v.crossover, resolution)) for k, v in laws.items()}
        if noise is not None:
            noise = replace(noise, grad_sq_norm=floor_interval(noise.grad_sq_norm, resolution),
                            trace_cov=floor_interval(noise.trace_cov, resolution),
                            b_noise=floor_interval(noise.b_noise, 2 * resolution))
    return CheckpointFits(label, int(grad_norm.shape[1]), laws, noise)


def float_resolution(dtype: str, budget: int) -> float:
    """Relative resolution of sums of ``budget`` terms computed in ``dtype``: eps·√budget (rounding errors of a
    sum add like a random walk), the floor of every interval width."""
    try:
        eps = float(np.finfo(np.dtype(dtype)).eps)
    except TypeError:
        return 0.0
    return eps * math.sqrt(max(int(budget), 1))
