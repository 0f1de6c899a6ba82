"""Tail indices: binned Hill (geometric MLE) and the α-stable estimator of Mohammadi et al. / Şimşekli et al."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from gradlab import schema
from gradlab.analysis.bootstrap import bootstrap_trials
from gradlab.analysis.tails import (BIN_RATIO, binned_hill, fit_alpha_stable, fit_hill, magnitude_counts,
                                    pooled_block_length, select_threshold, stable_pair_sums)


def test_binned_hill_exact_pareto_with_overflow_censoring():
    q = BIN_RATIO**-0.8
    counts = 1e5 * q ** np.arange(40) * (1 - q)
    assert float(binned_hill(counts, 1e5 * q**40, 0)) == pytest.approx(0.8, rel=1e-12)


def test_binned_hill_equals_numerical_likelihood_maximum():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, 30).astype(float)
    over = 7.0
    j = np.arange(30)

    def nll(a):
        q = BIN_RATIO ** (-a)
        return -(np.sum(counts * (j * np.log(q) + np.log1p(-q))) + over * 30 * np.log(q))

    ref = optimize.minimize_scalar(nll, bounds=(1e-3, 20), method="bounded", options={"xatol": 1e-10}).x
    assert float(binned_hill(counts, over, 0)) == pytest.approx(ref, rel=1e-6)


def test_magnitude_counts_keep_every_entry_above_underflow():
    v = np.array([-2e5, -3.0, -1e-13, 0.0, 2e-13, 0.5, 7.0, 3e4])
    h, _ = schema.entry_histogram(v)
    counts, over = magnitude_counts(h[:, None])
    assert counts.sum() == 3 and over[0] == 2  # |v| = 3, 0.5, 7 in log bins; 2e5 and 3e4 overflow


def _stable_hist(alpha: float, trials: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = stats.levy_stable.rvs(alpha, 0.0, size=(trials, d), random_state=np.random.default_rng(seed))
    return np.stack([schema.entry_histogram(row)[0] for row in x], 1), x


def test_hill_recovers_cauchy_tail_index():
    hist, _ = _stable_hist(1.0, 40, 500, 1)
    est, thr, n_tail, _ = fit_hill(hist, n_boot=999, rng=np.random.default_rng(2))
    assert est.contains(1.0) and est.contains(est.value) and n_tail >= 100 and thr > 0
    assert est.high - est.low < 0.3  # 1668 tail entries: ±0.05 by the Hill standard error α/√k, ×3 for binning


def test_hill_interval_includes_the_threshold_choice():
    """Issue 15 item 4: the bootstrap held the threshold fixed, so its interval left out the threshold selection.
    Re-selecting it in every resample widens the interval here (the fixed-threshold one is rebuilt below)."""
    hist, _ = _stable_hist(1.0, 40, 500, 1)
    est = fit_hill(hist, n_boot=499, rng=np.random.default_rng(2))[0]
    counts, over = magnitude_counts(hist)
    start = select_threshold(counts.sum(1), float(over.sum()))
    sample = np.concatenate([counts, over[None]], axis=0)

    def fixed(h):
        tot = np.moveaxis(h.sum(-1), -1, 0)
        return binned_hill(tot[:-1], tot[-1], start)[None]

    held = bootstrap_trials([sample], fixed, n_boot=499, rng=np.random.default_rng(2)).estimate(0)
    assert est.value == pytest.approx(held.value, rel=1e-12)
    assert est.high - est.low > 1.2 * (held.high - held.low), (est, held)


@pytest.mark.parametrize("alpha", [1.2, 1.7])
def test_alpha_stable_estimator_recovers_alpha(alpha):
    _, x = _stable_hist(alpha, 60, 400, int(alpha * 10))
    est = fit_alpha_stable(stable_pair_sums(x), 400, n_boot=999, rng=np.random.default_rng(3))
    assert est.contains(alpha) and est.contains(est.value)
    assert est.high - est.low < 0.35


def test_alpha_stable_gaussian_entries_give_two():
    x = np.random.default_rng(4).standard_normal((60, 400))
    est = fit_alpha_stable(stable_pair_sums(x), 400, n_boot=999, rng=np.random.default_rng(5))
    assert est.contains(2.0) and est.high - est.low < 0.35


def test_heavier_tail_at_larger_batch_is_detected():
    light, _ = _stable_hist(1.8, 30, 400, 6)
    heavy, _ = _stable_hist(1.1, 30, 400, 7)
    e_light = fit_hill(light, n_boot=499, rng=np.random.default_rng(8))[0]
    e_heavy = fit_hill(heavy, n_boot=499, rng=np.random.default_rng(9))[0]
    assert e_heavy.high < e_light.low


def test_alpha_stable_blocks_stay_inside_layers_and_per_layer_indices_differ():
    """Issue 15 item 4: block sums crossed layer boundaries and one index pooled layers of different scales and
    tails.  A Cauchy layer (α = 1, 300 entries) beside a Gaussian layer at 100× the scale (α = 2, 100 entries):
    the per-layer indices recover 1 and 2, and the pooled sums are exactly the per-layer sums at a shared K1."""
    rng = np.random.default_rng(0)
    cauchy = stats.levy_stable.rvs(1.0, 0.0, size=(60, 300), random_state=rng)
    x = np.concatenate([cauchy, 100 * rng.standard_normal((60, 100))], 1)
    spans = [(0, 300), (300, 400)]
    k1 = pooled_block_length(spans)
    assert k1 == 10
    pooled = stable_pair_sums(x, spans, k1)
    np.testing.assert_allclose(pooled, sum(stable_pair_sums(x[:, a:b], k1=k1) for a, b in spans), rtol=1e-12)
    one = fit_alpha_stable(stable_pair_sums(x[:, :300]), 300, n_boot=499, rng=np.random.default_rng(1))
    two = fit_alpha_stable(stable_pair_sums(x[:, 300:]), 100, n_boot=499, rng=np.random.default_rng(1))
    assert one.contains(1.0) and two.contains(2.0) and one.high < two.low


def test_vector_segments_follow_the_selected_layers():
    import json

    import xarray as xr

    from gradlab.analysis.run import vector_segments

    cfg = {"layers": ["a.weight", "a.bias", "b.weight"], "layer_sizes": [6, 2, 4], "selected": ["a.weight", "b.weight"]}
    ds = xr.Dataset({"grad_sum": (("vector_element",), np.zeros(10))}, attrs={"config": json.dumps(cfg)})
    assert vector_segments(ds) == [("a.weight", 0, 6), ("b.weight", 6, 10)]
    assert vector_segments(ds.assign_attrs(config="{}")) == [("all", 0, 10)]


def test_alpha_stable_notes_count_pairs_of_trials():
    """The α-stable bootstrap resamples pairs of trials: 8 trials are 4 pairs, and the note says so (it said
    'only 4 trial(s)')."""
    import numpy as np

    from gradlab.analysis.tails import fit_alpha_stable, stable_pair_sums

    v = np.random.default_rng(0).standard_cauchy((8, 400))
    est = fit_alpha_stable(stable_pair_sums(v), 400, n_boot=99, rng=np.random.default_rng(0))
    assert est.note.startswith("only 4 pairs of trials (8 or 9 trials): no interval") and "trial(s)" not in est.note


def test_alpha_stable_estimate_above_two_is_kept_and_flagged_not_clipped():
    """An α-stable index lies in (0, 2]; entries whose block sums partly cancel (dependent entries, as the softmax
    output bias has) give an estimate above 2.  It is reported as computed -- never clipped to 2 -- with a note and
    the ``outside_stable_range`` flag in the summary dict (it was reported bare: layers.4.bias 3.2-7.6)."""
    import math

    from gradlab.analysis.interval import Estimate
    from gradlab.analysis.tails import TailFit, outside_stable_range, stable_range_note

    rng = np.random.default_rng(0)
    g = rng.standard_normal((40, 400))
    blocks = g.reshape(40, 20, 20)  # K1 = ⌊√400⌋ = 20: one block per row of 20 entries
    v = (blocks - 0.5 * blocks.mean(-1, keepdims=True)).reshape(40, 400)  # block sums halved: α̂ ≈ ln 20/ln √5
    est = fit_alpha_stable(stable_pair_sums(v), 400, n_boot=199, rng=np.random.default_rng(1))
    sums = stable_pair_sums(v).sum(-1)
    raw = math.log(20) / (sums[2] / sums[3] - sums[0] / sums[1])
    assert est.value == pytest.approx(raw, rel=1e-12) and est.value > 3  # as computed, not clipped
    assert outside_stable_range(est) and "outside (0, 2]" in est.note and "not supported" in est.note
    assert "consistent with finite variance" in est.note
    inside = fit_alpha_stable(stable_pair_sums(rng.standard_cauchy((40, 400))), 400, n_boot=0, rng=rng)
    assert 0 < inside.value <= 2 and inside.note is None and stable_range_note(inside) is None
    assert "outside its validity" in stable_range_note(Estimate(-3.0))
    d = TailFit(Estimate(math.nan), math.nan, 0, math.nan, inside, {"a": est, "b": inside}).to_dict()
    assert d["alpha_stable"]["outside_stable_range"] is False and d["alpha_stable_range"] == "(0, 2]"
    assert d["alpha_stable_per_layer"]["a"]["outside_stable_range"] is True
    assert d["alpha_stable_per_layer"]["a"]["value"] == est.value
    assert d["alpha_stable_per_layer"]["b"]["outside_stable_range"] is False


def test_tail_index_figure_puts_hill_and_alpha_stable_on_separate_panels(tmp_path, monkeypatch):
    """Hill (the tail exponent of |x|: any positive value) and the α-stable index (defined on (0, 2]) were drawn
    on one linear axis.  Now: one panel each with its own y label, α = 2 drawn on the α-stable panel, no text
    overlapping, and a caption saying how to read each."""
    from matplotlib.lines import Line2D

    from gradlab.analysis import render
    from gradlab.analysis.run import analyze_store
    from gradlab.synthetic import write_synthetic_store

    store = tmp_path / "step.zarr"
    write_synthetic_store(store, protocol="step", trials=12, batch_sizes=(1, 2, 4, 8, 16), budget=16,
                          entry_alpha=1.5, vector_dim=400, seed=2)
    saved = {}
    real_save = render._save

    def spy(fig, out, stem, checks=None):
        saved[stem] = fig
        return real_save(fig, out, stem, checks)

    monkeypatch.setattr(render, "_save", spy)
    res = analyze_store(store, out_dir=tmp_path / "an", n_boot=19, seed=0, write_store=False)
    fig = saved["tail_index"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2, [ax.get_ylabel() for ax in panels]
    hill, stable = panels
    assert "Hill" in hill.get_ylabel() and "α-stable" not in hill.get_ylabel()
    assert "α-stable" in stable.get_ylabel() and "(0, 2]" in stable.get_ylabel()
    assert len(hill.containers) == len(stable.containers) == 2  # one errorbar series per checkpoint on each

    def flat_at(ax, y):
        return any(isinstance(ln, Line2D) and len(set(np.asarray(ln.get_ydata(), float))) == 1
                   and np.asarray(ln.get_ydata(), float)[0] == y for ln in ax.get_lines())

    assert flat_at(stable, 2.0) and not flat_at(hill, 2.0)
    assert res["figure_layout_problems"].get("tail_index") is None
    caption = res["figure_captions"]["tail_index.png"]
    assert "separate panels" in caption and "(0, 2]" in caption and "α = 2" in caption and "Hill" in caption
