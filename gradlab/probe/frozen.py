"""The frozen protocol: every minibatch gradient norm of every partition, from per-example Gram matrices.

At fixed θ, a trial's N examples are split into N/m consecutive minibatches B_k of size m.  With K the
per-example Gram matrix (Kᵢⱼ = gᵢ·gⱼ, see :mod:`gradlab.probe.gram`)

    ‖Σ_{i∈B_k} gᵢ‖² = 1ᵀ K_{B_k B_k} 1                       (a diagonal block sum of K)

so one K gives every batch size and every minibatch; nothing is recomputed per batch size (SCIENCE.md, "The two
probe protocols").  The minibatch gradient is ∇L_{B_k} = (1/m) Σ_{B_k} gᵢ (mean reduction) or Σ_{B_k} gᵢ (sum), and
S = Σ_k ∇L_{B_k}(θ) = c_m Σᵢ gᵢ with c_m = 1/m (mean) or 1 (sum), so ‖S‖ = c_m √(1ᵀK1).  Per layer the same
holds with that layer's K; a group's (weights, biases, all) squared norm is the sum of its layers'.  Block sums of
a positive semi-definite K are ≥ 0; rounding can make one -1e-17, so square roots take max(·, 0).

Estimators of ‖G‖² and tr Σ (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A)
--------------------------------------------------------------------------------------------------------------
G = (1/n) Σ_a g_a and Σ = (1/n) Σ_a (g_a − G)(g_a − G)ᵀ over the pool of n training examples, so that
Q := (1/n) Σ_a ‖g_a‖² = ‖G‖² + tr Σ.  Per trial, T₁ = tr K = Σᵢ ‖gᵢ‖² and T₂ = 1ᵀK1 = ‖Σᵢ gᵢ‖².  Each drawn
example is marginally uniform on the pool, so E[T₁] = N·Q.  For two different positions i ≠ j:

- with replacement the draws are independent: E[gᵢ·gⱼ] = ‖G‖²;
- without replacement (i, j) is a uniform pair of distinct pool items:
  E[gᵢ·gⱼ] = Σ_{a≠b} g_a·g_b / (n(n−1)) = (‖Σ_a g_a‖² − Σ_a ‖g_a‖²)/(n(n−1)) = (n‖G‖² − Q)/(n − 1).

With U = (T₂ − T₁)/(N(N−1)) (the mean off-diagonal entry of K, needs N ≥ 2), E[U] equals the above, hence the
unbiased per-trial estimates

    Q̂ = T₁/N,    ‖G‖²^ = U (with replacement)  or  ‖G‖²^ = ((n−1)·U + Q̂)/n (without),    tr Σ^ = Q̂ − ‖G‖²^.

(With N = n the without-replacement estimate is exactly T₂/n², i.e. ‖G‖² with no error.)  These imply the noise
law E‖g_B‖² = ‖G‖² + (tr Σ/m)·(n−m)/(n−1) without replacement and ‖G‖² + tr Σ/m with.  Per checkpoint the
trial estimates (independent across trials) are averaged -- still unbiased -- with standard error s/√T;
B_noise = tr Σ^/‖G‖²^ is a ratio of unbiased estimates (consistent, not itself unbiased).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradlab.schema import GROUPS


def block_sums(gram: torch.Tensor, batch_size: int, drop_last: bool = False) -> torch.Tensor:
    """1ᵀ K_{B_k B_k} 1 for every minibatch k = 0..N/m−1 of the partition into consecutive blocks of m.

    ``drop_last``: allow an m that does not divide N and use the ⌊N/m⌋ full minibatches (the last N mod m examples
    are unused, like a DataLoader with ``drop_last=True``); otherwise such an m is an error.
    """
    n = gram.shape[0]
    if n % batch_size and not drop_last:
        raise ValueError(f"batch size {batch_size} does not divide the budget {n}")
    nb = n // batch_size
    g = gram.contiguous()
    # the diagonal blocks as a strided view (nb, m, m): block k starts at entry (km, km); no copy when m ∤ N
    blocks = g.as_strided((nb, batch_size, batch_size), (batch_size * (n + 1), n, 1))
    return blocks.sum(dim=(1, 2))


def leading_sum(gram: torch.Tensor, used: int) -> float:
    """1ᵀ K_{[:used, :used]} 1 in float64, as the whole sum less the last N − used rows and columns (a thin strip,
    instead of a pass over a strided (used, used) slice)."""
    g = gram.double()
    if used == g.shape[0]:
        return float(g.sum())
    return float(g.sum() - g[used:].sum() - g[:, used:].sum() + g[used:, used:].sum())


def reduction_scale(batch_size: int, reduction: str) -> float:
    """c_m: 1/m for mean reduction, 1 for sum reduction."""
    if reduction == "mean":
        return 1.0 / batch_size
    if reduction == "sum":
        return 1.0
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


@dataclass(frozen=True)
class FrozenTrial:
    """One trial's frozen-protocol results over M batch sizes and L selected layers.

    ``grad_norm`` (M,): ‖S‖; ``grad_norm_layer`` (M, L); ``grad_norm_group`` (M, 3) over GROUPS (NaN for a group
    with no selected tensor); ``minibatch_grad_norm`` (M, N): ‖∇L_{B_k}(θ)‖, NaN past N/m; ``gram_trace`` tr K;
    ``gram_sum`` 1ᵀK1 (both over the selected tensors).
    """

    grad_norm: np.ndarray
    grad_norm_layer: np.ndarray
    grad_norm_group: np.ndarray
    minibatch_grad_norm: np.ndarray
    gram_trace: float
    gram_sum: float


def total_gram(grams: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """K = Σ_layers K_layer in float64 (the Gram matrix over all the given tensors)."""
    names = list(grams)
    total = grams[names[0]].double().clone()
    for name in names[1:]:
        total.add_(grams[name])
    return total


def _sqrt0(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(v, 0.0))


def frozen_trial(grams: Mapping[str, torch.Tensor], kinds: Mapping[str, str], batch_sizes: Sequence[int],
                 reduction: str, drop_last: bool = False, *, total: torch.Tensor | None = None) -> FrozenTrial:
    """Frozen-protocol norms of one trial from its per-layer Gram matrices (formulas in the module docstring).

    ``grams``: layer name -> (N, N) Gram matrix (ordered as the layers); ``kinds``: name -> ``weight``/``bias``.
    ``drop_last``: batch sizes that do not divide N use their ⌊N/m⌋ full minibatches, and S sums only those (the
    probe CLI requires divisors; the benchmark uses this for the blog's m = 3, 5, 6, 7 with N = 1024).
    ``total``: :func:`total_gram` of ``grams``, when the caller has built it already (the probe's unit hands the
    same K to the registered quantities), so the (N, N) sum is built once per trial; read, never modified.
    """
    names = list(grams)
    n = next(iter(grams.values())).shape[0]
    if total is None:
        total = total_gram(grams)
    layer_sum = np.array([float(grams[name].double().sum()) for name in names])
    gram_sum = float(total.sum())
    gram_trace = float(total.diagonal().sum())
    m_count = len(batch_sizes)
    grad_norm = np.empty(m_count)
    grad_norm_layer = np.empty((m_count, len(names)))
    grad_norm_group = np.full((m_count, len(GROUPS)), np.nan)
    minibatch = np.full((m_count, n), np.nan)
    group_masks = [np.array([g == "all" or kinds[name] == g for name in names]) for g in GROUPS]
    for i, m in enumerate(batch_sizes):
        c = reduction_scale(int(m), reduction)
        used = (n // int(m)) * int(m)
        if used == n:
            sums, lsum = gram_sum, layer_sum
        else:
            if not drop_last:
                raise ValueError(f"batch size {m} does not divide the budget {n}")
            lsum = np.array([leading_sum(grams[name], used) for name in names])
            sums = float(lsum.sum())
        grad_norm[i] = c * np.sqrt(max(sums, 0.0))
        grad_norm_layer[i] = c * _sqrt0(lsum)
        for j, mask in enumerate(group_masks):
            if mask.any():
                grad_norm_group[i, j] = c * np.sqrt(max(float(lsum[mask].sum()), 0.0))
        bs = block_sums(total, int(m), drop_last).cpu().numpy()
        minibatch[i, : bs.size] = c * _sqrt0(bs)
    return FrozenTrial(grad_norm, grad_norm_layer, grad_norm_group, minibatch, gram_trace, gram_sum)


def trial_moment_estimates(gram_trace: np.ndarray, gram_sum: np.ndarray, budget: int, pool_size: int,
                           replacement: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased per-trial estimates (‖G‖²^, tr Σ^) from T₁ = tr K and T₂ = 1ᵀK1 (derivation in the module
    docstring).  NaN when the budget N < 2."""
    t1 = np.asarray(gram_trace, dtype=np.float64)
    t2 = np.asarray(gram_sum, dtype=np.float64)
    if budget < 2:
        nan = np.full(t1.shape, np.nan)
        return nan, nan
    q = t1 / budget
    u = (t2 - t1) / (budget * (budget - 1))
    g2 = u if replacement else ((pool_size - 1) * u + q) / pool_size
    return g2, q - g2


@dataclass(frozen=True)
class MomentEstimates:
    """Per-checkpoint estimates over T trials: means and standard errors of ‖G‖² and tr Σ, and B_noise."""

    grad_sq_norm: float
    grad_sq_norm_se: float
    trace_cov: float
    trace_cov_se: float
    b_noise: float


def checkpoint_estimates(gram_trace: np.ndarray, gram_sum: np.ndarray, budget: int, pool_size: int,
                         replacement: bool) -> MomentEstimates:
    """Average the unbiased trial estimates over trials; standard errors s/√T (NaN for T < 2)."""
    g2, tr = trial_moment_estimates(gram_trace, gram_sum, budget, pool_size, replacement)
    t = g2.size

    def se(v: np.ndarray) -> float:
        return float(np.std(v, ddof=1) / np.sqrt(t)) if t >= 2 else float("nan")

    g2m = float(np.mean(g2)) if t else float("nan")
    trm = float(np.mean(tr)) if t else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        b = float(np.float64(trm) / np.float64(g2m))
    return MomentEstimates(g2m, se(g2), trm, se(tr), b)
