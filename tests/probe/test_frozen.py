"""Frozen protocol: block sums, minibatch norms vs a naive per-minibatch backward (float64), the noise law on
linear regression with known G and Σ (analytic), and unbiased ‖G‖² / tr Σ estimators (coverage)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.models import build_model
from gradlab.probe.frozen import (block_sums, checkpoint_estimates, frozen_trial, leading_sum, total_gram,
                                  trial_moment_estimates)
from gradlab.probe.gram import GramEngine
from gradlab.probe.sampling import draw_trial
from gradlab.schema import GROUPS


def test_block_sums_are_diagonal_block_sums():
    k = torch.arange(36.0, dtype=torch.float64).reshape(6, 6)
    for m in (1, 2, 3, 6):
        expected = [float(k[i:i + m, i:i + m].sum()) for i in range(0, 6, m)]
        assert block_sums(k, m).tolist() == expected


def test_block_sums_and_leading_sums_when_m_does_not_divide_n():
    # a view with a storage offset and a transposed (non-contiguous) one: the strided block view must not assume
    # either away
    big = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in (big[2:, 2:], big[2:, 2:].T, big[1:8, 1:8].contiguous()):
        n = k.shape[0]
        for m in (2, 3, 4, 5, 6):
            used = (n // m) * m
            expected = [float(k[i:i + m, i:i + m].sum()) for i in range(0, used, m)]
            np.testing.assert_allclose(block_sums(k, m, drop_last=True).numpy(), expected, rtol=1e-14)
            assert leading_sum(k, used) == pytest.approx(float(k[:used, :used].sum()), rel=1e-13)
        with pytest.raises(ValueError, match="does not divide"):
            block_sums(k, 2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_minibatch_norms_match_naive_per_minibatch_backward(digits, reduction):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = build_model("mlp", (1, 8, 8), 10, widths=[16, 12])
    names = [n for n, _ in net.named_parameters()]
    selected = ["layers.0.bias", "layers.2.weight", "layers.4.weight", "layers.4.bias"]
    idx = draw_trial(0, 0, 0, 24, len(digits.train))
    x, y = digits.train.x[idx], digits.train.y[idx]
    res = GramEngine(net, selected, dtype=torch.float64)(x, y)
    sizes = (1, 2, 3, 5, 8, 24)  # 5 does not divide 24: its 4 full minibatches (drop_last)
    kinds = {n: n.rsplit(".", 1)[1] for n in selected}
    with pytest.raises(ValueError, match="does not divide"):
        frozen_trial(res.gram, kinds, sizes, reduction)
    ft = frozen_trial(res.gram, kinds, sizes, reduction, drop_last=True)
    ref = copy.deepcopy(net).double()
    params = dict(ref.named_parameters())
    for i, m in enumerate(sizes):
        s = {n: torch.zeros_like(params[n]) for n in selected}
        for k in range(24 // m):
            ref.zero_grad()
            F.cross_entropy(ref(x[k * m:(k + 1) * m].double()), y[k * m:(k + 1) * m], reduction=reduction).backward()
            g = torch.cat([params[n].grad.flatten() for n in selected])
            assert ft.minibatch_grad_norm[i, k] == pytest.approx(float(g.norm()), rel=1e-10)
            for n in selected:
                s[n] += params[n].grad
        assert np.isnan(ft.minibatch_grad_norm[i, 24 // m:]).all()
        total = torch.cat([v.flatten() for v in s.values()])
        assert ft.grad_norm[i] == pytest.approx(float(total.norm()), rel=1e-10)
        for j, n in enumerate(selected):
            assert ft.grad_norm_layer[i, j] == pytest.approx(float(s[n].norm()), rel=1e-10)
        w = torch.cat([s[n].flatten() for n in selected if kinds[n] == "weight"])
        assert ft.grad_norm_group[i, GROUPS.index("weight")] == pytest.approx(float(w.norm()), rel=1e-10)
    assert set(names) >= set(selected)


# ----- linear regression: gᵢ = (w·xᵢ + b − yᵢ)(xᵢ, 1), so G and Σ over the pool are known in closed form -----

def _linear_regression_pool(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, nn.Linear, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, d)))
    y = torch.from_numpy(rng.normal(size=n))
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(rng.normal(size=(1, d))))
        model.bias.fill_(0.3)
    resid = (x @ model.weight.detach().T).squeeze(1) + 0.3 - y
    grads = (resid[:, None] * torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)).numpy()  # (n, d+1)
    return x, y, model, grads


def test_frozen_trial_with_a_given_total_gram_is_bitwise_the_same(digits):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = build_model("mlp", (1, 8, 8), 10, widths=[16, 12])
    selected = [n for n, _ in net.named_parameters()]
    idx = draw_trial(0, 0, 0, 24, len(digits.train))
    res = GramEngine(net, selected, dtype=torch.float64)(digits.train.x[idx], digits.train.y[idx])
    kinds = {n: n.rsplit(".", 1)[1] for n in selected}
    total = total_gram(res.gram)
    before = total.clone()
    a = frozen_trial(res.gram, kinds, (1, 5, 24), "mean", drop_last=True)
    b = frozen_trial(res.gram, kinds, (1, 5, 24), "mean", drop_last=True, total=total)
    for name in ("grad_norm", "grad_norm_layer", "grad_norm_group", "minibatch_grad_norm"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    assert (a.gram_trace, a.gram_sum) == (b.gram_trace, b.gram_sum)
    assert torch.equal(total, before)  # read, not modified: the quantities get the same tensor afterwards

def _half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - target) ** 2).sum()


@pytest.mark.parametrize("replacement", [False, True])
def test_noise_law_on_linear_regression(replacement):
    n, d, budget, trials = 30, 3, 12, 400
    x, y, model, grads = _linear_regression_pool(n, d, seed=11)
    g_mean = grads.mean(0)
    g2_true = float(g_mean @ g_mean)
    tr_true = float(((grads - g_mean) ** 2).sum(1).mean())  # population covariance (1/n)
    engine = GramEngine(model, ["weight", "bias"], loss_fn=_half_squared_error, dtype=torch.float64)
    sizes = (1, 2, 3, 4, 6, 12)
    per_trial = np.empty((trials, len(sizes)))
    traces, sums = np.empty(trials), np.empty(trials)
    for t in range(trials):
        idx = draw_trial(7, 0, t, budget, n, replacement)
        res = engine(x[idx], y[idx])
        assert torch.allclose(res.gram["weight"] + res.gram["bias"],
                              torch.from_numpy(grads[idx] @ grads[idx].T), rtol=1e-10, atol=1e-12)
        ft = frozen_trial(res.gram, {"weight": "weight", "bias": "bias"}, sizes, "mean")
        for i, m in enumerate(sizes):
            per_trial[t, i] = np.nanmean(ft.minibatch_grad_norm[i, : budget // m] ** 2)
        traces[t], sums[t] = ft.gram_trace, ft.gram_sum
    for i, m in enumerate(sizes):
        fpc = 1.0 if replacement else (n - m) / (n - 1)
        expected = g2_true + tr_true / m * fpc
        se = per_trial[:, i].std(ddof=1) / np.sqrt(trials)
        assert abs(per_trial[:, i].mean() - expected) < 4 * se, (m, per_trial[:, i].mean(), expected, se)
    est = checkpoint_estimates(traces, sums, budget, n, replacement)
    assert abs(est.grad_sq_norm - g2_true) < 4 * est.grad_sq_norm_se
    assert abs(est.trace_cov - tr_true) < 4 * est.trace_cov_se
    assert est.b_noise == pytest.approx(est.trace_cov / est.grad_sq_norm)


def test_full_pool_without_replacement_gives_exact_gradient():
    _, _, _, grads = _linear_regression_pool(15, 2, seed=3)
    g_mean = grads.mean(0)
    t1, t2 = np.array([(grads**2).sum()]), np.array([grads.sum(0) @ grads.sum(0)])
    g2, tr = trial_moment_estimates(t1, t2, 15, 15, replacement=False)
    assert g2[0] == pytest.approx(g_mean @ g_mean, rel=1e-12)
    assert tr[0] == pytest.approx(((grads - g_mean) ** 2).sum(1).mean(), rel=1e-12)


@pytest.mark.parametrize("replacement", [False, True])
def test_moment_estimators_are_unbiased_and_intervals_cover(replacement):
    """95% intervals mean ± 1.96·se over T trials cover ‖G‖² and tr Σ in about 95% of 400 replications, and the
    mean estimate over all replications is within 4 standard errors of the truth (a wrong finite-population
    factor is a bias of ~50% here: n = 16, N = 8)."""
    rng = np.random.default_rng(2024)
    n, budget, trials, reps = 16, 8, 30, 400
    grads = rng.normal(size=(n, 5)) + np.array([0.6, -0.4, 0.0, 0.3, 0.2])
    g_mean = grads.mean(0)
    truth = {"g2": float(g_mean @ g_mean), "tr": float(((grads - g_mean) ** 2).sum(1).mean())}
    cover = {"g2": 0, "tr": 0}
    means = {"g2": [], "tr": []}
    for r in range(reps):
        t1, t2 = np.empty(trials), np.empty(trials)
        for t in range(trials):
            sub = grads[draw_trial(r, 0, t, budget, n, replacement)]
            t1[t], s = (sub**2).sum(), sub.sum(0)
            t2[t] = s @ s
        est = checkpoint_estimates(t1, t2, budget, n, replacement)
        for key, val, se in (("g2", est.grad_sq_norm, est.grad_sq_norm_se), ("tr", est.trace_cov, est.trace_cov_se)):
            cover[key] += abs(val - truth[key]) <= 1.96 * se
            means[key].append(val)
    for key in cover:
        assert 0.91 <= cover[key] / reps <= 0.985, (key, cover[key] / reps)
        m = np.array(means[key])
        assert abs(m.mean() - truth[key]) < 4 * m.std(ddof=1) / np.sqrt(reps), key
