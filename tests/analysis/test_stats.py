"""Chunked (dask) statistics of a store equal one-shot numpy on the loaded arrays, done trials only."""

from __future__ import annotations

import numpy as np

from gradlab.analysis import stats
from gradlab.store import open_store
from gradlab.synthetic import write_synthetic_store


def test_chunked_statistics_equal_one_shot_numpy(tmp_path):
    path = tmp_path / "s.zarr"
    write_synthetic_store(path, trials=11, trial_chunk=3, done_trials=7, batch_sizes=(1, 2, 4, 8), budget=8,
                          pool_size=64, seed=1)
    ds = open_store(path)
    assert ds["grad_norm"].chunks is not None and len(ds["grad_norm"].chunks[2]) == 4  # lazily chunked
    done = stats.done_mask(ds)
    mom = stats.norm_moments(ds["grad_norm"], done, 8).compute()
    x = ds["grad_norm"].values  # (checkpoint, batch_size, trial)
    d = done.values
    for c in range(2):
        xc = x[c][:, d[c]]
        np.testing.assert_allclose(mom["grad_norm_mean"][c], xc.mean(1), rtol=1e-13)
        np.testing.assert_allclose(mom["grad_norm_std"][c], xc.std(1, ddof=1), rtol=1e-12)
        np.testing.assert_allclose(mom["grad_norm_std_normalised"][c],
                                   xc.std(1, ddof=1) * xc.mean(1)[-1] / xc.mean(1), rtol=1e-12)
    pooled = stats.pooled_entry_hist(ds, done).compute()
    h = ds["entry_hist"].values
    np.testing.assert_array_equal(pooled[1], h[1][:, d[1]].sum(1))
    q = stats.minibatch_sq_norm(ds, "mean").compute()
    mb = ds["minibatch_grad_norm"].values
    np.testing.assert_allclose(q.values, np.nanmean(mb**2, -1), rtol=1e-13)
    hist = stats.norm_histograms(ds["grad_norm"], done, bins=5)
    for c in range(2):
        xc = x[c][:, d[c]]
        edges = np.linspace(xc.min(), xc.max(), 6)
        np.testing.assert_allclose(hist["norm_bin_lower"][c], edges[:-1], rtol=1e-13)
        for m in range(4):
            np.testing.assert_array_equal(hist["count"][c, m], np.histogram(xc[m], edges)[0])
    assert stats.missing_units(ds) == ["checkpoint 'late': 4 of 11 trials not done (7..10)"]


def test_sum_reduction_minibatch_norms_convert_to_mean_units(tmp_path):
    kw = dict(trials=4, batch_sizes=(1, 2, 4), budget=4, pool_size=32, seed=2)
    write_synthetic_store(tmp_path / "mean.zarr", reduction="mean", **kw)
    write_synthetic_store(tmp_path / "sum.zarr", reduction="sum", **kw)
    q_mean = stats.minibatch_sq_norm(open_store(tmp_path / "mean.zarr"), "mean").values
    q_sum = stats.minibatch_sq_norm(open_store(tmp_path / "sum.zarr"), "sum").values
    np.testing.assert_allclose(q_sum, q_mean, rtol=1e-12)
