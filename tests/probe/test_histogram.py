"""Torch entry histograms equal the schema's numpy definition, edge values included; scaled histograms too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlab.probe import histogram as histogram_module
from gradlab.probe.histogram import N_BINS, ScaledHistograms, entry_histogram_torch
from gradlab.schema import entry_bin_edges, entry_histogram


def _awkward(seed: int = 0, n: int = 50_000) -> np.ndarray:
    """Heavy-tailed values over 20 decades, every bin edge and its float neighbours, zeros and non-finite values."""
    rng = np.random.default_rng(seed)
    lower, upper = entry_bin_edges()
    edges = np.r_[lower[np.isfinite(lower)], upper[np.isfinite(upper)]]
    return np.r_[rng.standard_cauchy(n) * 10.0 ** rng.uniform(-15, 6, n), edges, np.nextafter(edges, 0),
                 np.nextafter(edges, np.inf), 0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, -1e300]


@pytest.mark.parametrize("chunk", [None, 977])  # the default (one chunk here) and many uneven chunks
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_histogram_equals_the_schema_definition(monkeypatch, dtype, chunk):
    if chunk is not None:
        monkeypatch.setattr(histogram_module, "HIST_CHUNK", chunk)
    with np.errstate(over="ignore"):
        v = _awkward().astype(dtype)  # -1e300 overflows to -inf in float32
    if chunk is not None:  # spread the edge and non-finite values over many chunks
        v = v[np.random.default_rng(3).permutation(v.size)]
    counts, bad = entry_histogram_torch(torch.from_numpy(v))
    ref, ref_bad = entry_histogram(v)
    assert counts.shape == (N_BINS,) == ref.shape
    assert bad == ref_bad == (3 if dtype == np.float64 else 4) and np.array_equal(counts, ref)
    assert counts.sum() + bad == v.size  # nothing clipped, nothing lost


def test_scaled_histograms_equal_histograms_of_the_scaled_values():
    v = _awkward(seed=1)
    v = v[np.isfinite(v) & (np.abs(v) < 1e290)]
    hist = ScaledHistograms(torch.from_numpy(np.r_[v, np.nan]))
    assert hist.nonfinite == 1
    rng = np.random.default_rng(2)
    # random values lie within rounding of an edge with probability ~1e-14 each: equality is exact here
    w = rng.standard_cauchy(100_000) * 10.0 ** rng.uniform(-15, 6, 100_000)
    hw = ScaledHistograms(torch.from_numpy(w))
    for m in (1, 2, 3, 5, 7, 16, 1000, 1024):
        assert np.array_equal(hw.counts(1.0 / m), entry_histogram(w / m)[0]), m
        assert hist.counts(1.0 / m).sum() == v.size
    # exact powers of two keep even the edge values exact
    assert np.array_equal(hist.counts(1.0), entry_histogram(v)[0])
    with pytest.raises(ValueError, match="positive finite"):
        hist.counts(0.0)
