"""`gradlab analyze` on stores a user can make that the laws cannot be fitted on: one line and exit 2, no traceback."""

from __future__ import annotations

import pytest

from gradlab.cli import main
from gradlab.synthetic import write_synthetic_store


@pytest.mark.parametrize("protocol", ["frozen", "step"])
def test_one_batch_size_exits_2_with_one_line(tmp_path, capsys, protocol):
    path = tmp_path / "one.zarr"
    write_synthetic_store(path, protocol=protocol, batch_sizes=(4,), budget=16, trials=6, seed=0)
    assert main(["analyze", str(path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one batch size (m = 4)" in err and "--batch-sizes" in err


def test_whole_pool_trials_give_exact_values_not_a_degenerate_bootstrap():
    """Every trial sums the whole pool (budget = pool size, without replacement): the per-trial U-statistics are the
    pool's exact ‖G‖² and tr Σ (equal in every trial up to rounding).  They are reported as exact, with the
    floating-point resolution as the interval and a note; no scipy text."""
    import numpy as np

    from gradlab.analysis.moments import WHOLE_POOL, moment_estimates

    rng = np.random.default_rng(0)
    g = rng.normal(size=(64, 5)) + 0.3  # the pool's 64 per-example gradients
    t1, t2 = float((g ** 2).sum()), float((g.sum(0) ** 2).sum())
    jitter = 1 + 1e-9 * rng.normal(size=8)  # 8 trials, same examples, other summation orders
    est = moment_estimates(t1 * jitter, t2 * jitter, 64, 64, False, n_boot=999, rng=rng, resolution=1e-6)
    mean = g.mean(0)
    g2 = float(mean @ mean)
    tr = float(((g - mean) ** 2).sum(1).mean()) * 64 / 63  # the pool's unbiased tr Σ under this model
    n, u = 64, (t2 - t1) / (64 * 63)
    want_g2 = ((n - 1) * u + t1 / n) / n
    assert est["grad_sq_norm"].value == pytest.approx(want_g2, rel=1e-8)
    assert est["grad_sq_norm"].value == pytest.approx(g2, rel=1e-8)  # exactly the pool's ‖G‖²
    assert est["trace_cov"].value == pytest.approx(t1 / n - g2, rel=1e-8)
    for e in est.values():
        assert e.note == WHOLE_POOL
        assert e.low < e.value < e.high and (e.high - e.low) == pytest.approx(2e-6 * abs(e.value), rel=1e-6)
    del tr
    # a budget below the pool: an ordinary bootstrap interval, no whole-pool note
    part = moment_estimates(t1 * (1 + 0.1 * rng.normal(size=8)), t2 * (1 + 0.1 * rng.normal(size=8)), 32, 64,
                            False, n_boot=999, rng=rng, resolution=1e-6)
    assert all(e.note != WHOLE_POOL for e in part.values())


def test_degenerate_bootstrap_note_is_in_plain_words():
    import numpy as np

    from gradlab.analysis.bootstrap import bootstrap_trials

    res = bootstrap_trials([np.full((1, 12), 3.0)], lambda s: s.mean(-1)[..., 0][None], n_boot=199,
                           rng=np.random.default_rng(0))
    note = res.note or ""
    assert "every trial gives the same value" in note and "BCa" not in note and "scipy" not in note
