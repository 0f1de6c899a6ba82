"""Synthetic probe stores written to the exact probe schema, with a known truth (for tests and demos).

Per checkpoint, a pool of n per-example gradients gᵢ ∈ R^d is built so that its mean G and its population
covariance Σ = (1/n) Σᵢ (gᵢ − G)(gᵢ − G)ᵀ have *exactly* the chosen ‖G‖² and tr Σ.  Trials draw N examples from
the pool (with or without replacement, per the ``replacement`` flag) and split them into N/m consecutive
minibatches, so every minibatch is a uniform draw of m pool examples and E‖g_B‖² = ‖G‖² + c_m tr Σ/m holds
exactly, c_m = (n − m)/(n − 1) without replacement (McCandlish et al. 2018).

- frozen protocol: ``minibatch_grad_norm`` is ‖g_B‖ (mean reduction) or ‖s_B‖ (sum) of every minibatch;
  ``gram_trace``/``gram_sum`` are Σᵢ‖gᵢ‖² and ‖Σᵢ gᵢ‖² of the trial's N examples, and ``grad_sq_norm``,
  ``trace_cov``, ``b_noise`` their unbiased moment estimates over trials.
- step protocol: the lr → 0 limit of the step protocol (θ does not move between steps), so S = Σ_k ∇L_{B_k}(θ)
  with the store's reduction and ``displacement`` = lr·‖S‖.  It follows the same noise model; it is *not* a
  simulation of training dynamics.
- ``grad_norm`` = ‖S‖, per layer and per group (the first coordinates form ``layers.0.weight``, the rest
  ``layers.0.bias``), ``entry_hist`` the binned entries of S.  With ``entry_alpha`` the entries of S written to
  ``entry_hist`` and ``grad_sum`` are instead symmetric α-stable samples (``scipy.stats.levy_stable``, scale
  ``entry_scale``), a known tail index per batch size for the tail estimators.
- distance/cosine to init are made-up smooth values (distance grows with the checkpoint index).

Randomness: the pool of checkpoint c from SeedSequence([seed, c]); trial t's draws from SeedSequence([seed, c, t]).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradlab import schema
from gradlab.analysis.noise_model import finite_population_factor
from gradlab.store import StoreWriter, create_store


def make_pool(grad_sq_norm: float, trace_cov: float, pool_size: int, dim: int,
              rng: np.random.Generator) -> np.ndarray:
    """n × d per-example gradients whose mean has squared norm ``grad_sq_norm`` and whose population covariance
    has trace ``trace_cov`` exactly (anisotropic: coordinate scales decay like 1/(1 + k))."""
    if pool_size < 2 or dim < 1:
        raise ValueError("pool_size must be ≥ 2 and dim ≥ 1")
    z = rng.standard_normal((pool_size, dim)) / (1.0 + np.arange(dim))
    z -= z.mean(0)
    z *= np.sqrt(trace_cov / np.mean(np.sum(z**2, 1)))
    g = rng.standard_normal(dim)
    g *= np.sqrt(grad_sq_norm) / np.linalg.norm(g)
    return g + z


def draw_trials(pool_size: int, budget: int, trials: int, replacement: bool, seed: int, checkpoint: int) -> np.ndarray:
    """(trial, N) pool indices; trial t uses SeedSequence([seed, checkpoint, t])."""
    if not replacement and budget > pool_size:
        raise ValueError(f"budget {budget} exceeds pool_size {pool_size} without replacement")
    out = np.empty((trials, budget), dtype=np.int64)
    for t in range(trials):
        rng = np.random.default_rng(np.random.SeedSequence([seed, checkpoint, t]))
        out[t] = rng.integers(0, pool_size, budget) if replacement else rng.permutation(pool_size)[:budget]
    return out


def minibatch_sums(pool: np.ndarray, index: np.ndarray, batch_size: int) -> np.ndarray:
    """s_B of every minibatch: (trial, N/m, d) sums of consecutive blocks of ``index`` (trial, N)."""
    t, n = index.shape
    if n % batch_size:
        raise ValueError(f"batch size {batch_size} does not divide the budget {n}")
    return pool[index].reshape(t, n // batch_size, batch_size, pool.shape[1]).sum(2)


def minibatch_sq_norms(pool: np.ndarray, index: np.ndarray, batch_sizes: Sequence[int]) -> np.ndarray:
    """q[m, t]: the mean over trial t's minibatches of ‖g_B‖² = ‖s_B‖²/m², for every batch size."""
    return np.stack([np.mean(np.sum(minibatch_sums(pool, index, m) ** 2, -1), -1) / m**2 for m in batch_sizes])


def _per_checkpoint(value: float | Sequence[float], n: int, name: str) -> list[float]:
    vals = [float(value)] * n if np.isscalar(value) else [float(v) for v in value]  # type: ignore[arg-type]
    if len(vals) != n:
        raise ValueError(f"{name} needs one value per checkpoint ({n}); got {len(vals)}")
    return vals


def write_synthetic_store(
    path: str | os.PathLike,
    *,
    protocol: str = "frozen",
    checkpoints: Sequence[str] = ("early", "late"),
    grad_sq_norm: float | Sequence[float] = 1.0,
    trace_cov: float | Sequence[float] = 16.0,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    budget: int = 64,
    trials: int = 32,
    pool_size: int = 1024,
    replacement: bool = False,
    reduction: str = "mean",
    dim: int = 16,
    bias_dim: int = 4,
    lr: float = 0.01,
    entry_alpha: float | Mapping[int, float] | None = None,
    entry_scale: float = 1.0,
    vector_dim: int = 1024,
    keep_vectors: bool = False,
    done_trials: int | None = None,
    seed: int = 0,
    trial_chunk: int = 8,
) -> dict[str, Any]:
    """Write a synthetic probe store (see the module doc) and return its truth.

    ``done_trials`` marks only the first k trials of the *last* checkpoint done (an unfinished store); the
    others stay at their fill values.  Returns ``{"grad_sq_norm": [...], "trace_cov": [...], "b_noise": [...],
    "entry_alpha": {m: α}}`` (per checkpoint), also stored in the root attr ``synthetic_truth``.
    """
    if protocol not in ("step", "frozen"):
        raise ValueError(f"protocol must be 'step' or 'frozen', got {protocol!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n_c, batch_sizes = len(checkpoints), [int(m) for m in batch_sizes]
    g2s = _per_checkpoint(grad_sq_norm, n_c, "grad_sq_norm")
    trs = _per_checkpoint(trace_cov, n_c, "trace_cov")
    alphas = ({m: float(entry_alpha) for m in batch_sizes} if isinstance(entry_alpha, (int, float))
              else {int(m): float(a) for m, a in entry_alpha.items()} if entry_alpha is not None else None)
    if alphas is not None and set(alphas) != set(batch_sizes):
        raise ValueError("entry_alpha needs one α per batch size")
    vec_dim = vector_dim if alphas is not None else dim
    layers = ["layers.0.weight", "layers.0.bias"]
    layer_slices = [slice(0, dim - bias_dim), slice(dim - bias_dim, dim)]
    lower, upper = schema.entry_bin_edges()
    truth = {"grad_sq_norm": g2s, "trace_cov": trs, "b_noise": [t / g if g > 0 else float("inf") for g, t in
                                                                zip(g2s, trs, strict=True)],
             "entry_alpha": {str(m): a for m, a in alphas.items()} if alphas else None}
    sizes = {"checkpoint": n_c, "batch_size": len(batch_sizes), "trial": trials, "layer": 2, "group": 3,
             "example": budget, "minibatch": budget, "bin": lower.size, "vector_element": vec_dim}
    coords = {
        "checkpoint": ("checkpoint", list(checkpoints), {"long_name": "checkpoint"}),
        "checkpoint_path": ("checkpoint", [f"synthetic/{c}.pt" for c in checkpoints], {}),
        "checkpoint_epoch": ("checkpoint", np.arange(n_c) * 10 + 2, {"long_name": "epoch", "units": "epochs"}),
        "batch_size": ("batch_size", np.asarray(batch_sizes), {"long_name": "batch size m", "units": "examples"}),
        "trial": ("trial", np.arange(trials), {"long_name": "trial"}),
        "layer": ("layer", layers, {"long_name": "parameter tensor"}),
        "param_kind": ("layer", ["weight", "bias"], {}),
        "layer_size": ("layer", [dim - bias_dim, bias_dim], {"long_name": "number of entries", "units": "1"}),
        "selected": ("layer", [True, True], {"long_name": "selected by --params (enters the gradient norms)",
                                             "units": "1"}),
        "group": ("group", list(schema.GROUPS), {"long_name": "parameter group"}),
        "example": ("example", np.arange(budget), {}),
        "minibatch": ("minibatch", np.arange(budget), {}),
        "bin": ("bin", np.arange(lower.size), {}),
        "bin_lower": ("bin", lower, {"long_name": "entry of S", "units": "loss / parameter unit"}),
        "bin_upper": ("bin", upper, {"long_name": "entry of S", "units": "loss / parameter unit"}),
    }
    if alphas is not None or keep_vectors:
        coords["vector_element"] = ("vector_element", np.arange(vec_dim), {})
    config = {"synthetic": True, "protocol": protocol, "batch_sizes": batch_sizes, "budget": budget, "trials": trials,
              "pool_size": pool_size, "replacement": replacement, "reduction": reduction, "seed": seed,
              "grad_sq_norm": g2s, "trace_cov": trs, "entry_alpha": truth["entry_alpha"], "dim": dim}
    keep = keep_vectors or alphas is not None
    if not keep:
        sizes.pop("vector_element")
    create_store(path, kind="probe", sizes=sizes, coords=coords,
                 variables=schema.probe_variables(protocol, keep_vectors=keep),
                 unit_dims=("checkpoint", "trial"), chunks={"checkpoint": 1, "trial": trial_chunk},
                 config=config,
                 attrs={"protocol": protocol, "reduction": reduction, "budget": budget, "replacement": replacement,
                        "pool_size": pool_size, "seed": seed, "lr": lr, "keep": "vectors" if keep else "histograms",
                        "synthetic_truth": json.dumps(truth)})
    with StoreWriter(path) as w:
        for c in range(n_c):
            _write_checkpoint(w, c, protocol=protocol, g2=g2s[c], tr=trs[c], batch_sizes=batch_sizes, budget=budget,
                              trials=trials, pool_size=pool_size, replacement=replacement, reduction=reduction,
                              dim=dim, lr=lr, layer_slices=layer_slices, alphas=alphas, entry_scale=entry_scale,
                              vec_dim=vec_dim, keep=keep, seed=seed)
            n_done = trials if (done_trials is None or c < n_c - 1) else done_trials
            if n_done:
                w.mark_done({"checkpoint": c, "trial": slice(0, n_done)})
    return truth


def _write_checkpoint(w: StoreWriter, c: int, *, protocol: str, g2: float, tr: float, batch_sizes: list[int],
                      budget: int, trials: int, pool_size: int, replacement: bool, reduction: str, dim: int,
                      lr: float, layer_slices: list[slice], alphas: dict[int, float] | None, entry_scale: float,
                      vec_dim: int, keep: bool, seed: int) -> None:
    from scipy import stats

    pool = make_pool(g2, tr, pool_size, dim, np.random.default_rng(np.random.SeedSequence([seed, c])))
    index = draw_trials(pool_size, budget, trials, replacement, seed, c)
    M = len(batch_sizes)
    reg = {"checkpoint": c}
    norm = np.zeros((M, trials))
    norm_layer = np.zeros((M, trials, 2))
    hist = np.zeros((M, trials, schema.entry_bin_edges()[0].size), dtype=np.int32)
    vectors = np.zeros((M, trials, vec_dim), dtype=np.float32)
    mb_norm = np.full((M, trials, budget), np.nan)
    step = np.zeros((3, M, trials))
    for i, m in enumerate(batch_sizes):
        s_b = minibatch_sums(pool, index, m)  # (trial, N/m, d)
        g = s_b / m if reduction == "mean" else s_b
        s = g.sum(1)  # S: (trial, d)
        norms_b = np.linalg.norm(g, axis=-1)
        mb_norm[i, :, : budget // m] = norms_b
        step[0, i], step[2, i] = norms_b.mean(1), norms_b.max(1)
        step[1, i] = norms_b.std(1, ddof=1) if norms_b.shape[1] > 1 else 0.0
        norm[i] = np.linalg.norm(s, axis=-1)
        norm_layer[i] = np.stack([np.linalg.norm(s[:, sl], axis=-1) for sl in layer_slices], -1)
        if alphas is None:
            entries = s
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, c, 10_000 + i]))
            entries = stats.levy_stable.rvs(alphas[m], 0.0, scale=entry_scale, size=(trials, vec_dim),
                                            random_state=rng)
        vectors[i] = entries
        for t in range(trials):
            hist[i, t] = schema.entry_histogram(entries[t])[0]
    w.write("grad_norm", reg, norm)
    w.write("grad_norm_layer", reg, norm_layer)
    w.write("grad_norm_group", reg, np.stack([norm, norm_layer[..., 0], norm_layer[..., 1]], -1))
    w.write("entry_hist", reg, hist)
    w.write("nonfinite_count", reg, np.zeros((M, trials), dtype=np.int64))
    w.write("example_index", reg, index)
    if keep:
        w.write("grad_sum", reg, vectors)
    if protocol == "frozen":
        w.write("minibatch_grad_norm", reg, mb_norm)
        per = pool[index]  # (trial, N, d)
        gram_trace = np.sum(per**2, axis=(1, 2))
        gram_sum = np.sum(per.sum(1) ** 2, -1)
        w.write("gram_trace", reg, gram_trace)
        w.write("gram_sum", reg, gram_sum)
        n = float(budget)
        c_n = float(finite_population_factor(n, pool_size, replacement))
        # per trial, unbiased: E gram_trace = N(‖G‖² + tr Σ), E gram_sum = N²‖G‖² + N c_N tr Σ.
        tr_t = (n * gram_trace - gram_sum) / (n * (n - c_n))
        g2_t = gram_trace / n - tr_t
        g2_hat, tr_hat = float(g2_t.mean()), float(tr_t.mean())
        se = (lambda v: float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan"))
        w.write("grad_sq_norm", reg, g2_hat)
        w.write("trace_cov", reg, tr_hat)
        w.write("grad_sq_norm_se", reg, se(g2_t))
        w.write("trace_cov_se", reg, se(tr_t))
        w.write("b_noise", reg, tr_hat / g2_hat)
    else:
        w.write("displacement", reg, lr * norm)
        w.write("step_grad_norm_mean", reg, step[0])
        w.write("step_grad_norm_std", reg, step[1])
        w.write("step_grad_norm_max", reg, step[2])
    rng = np.random.default_rng(np.random.SeedSequence([seed, c, 99_999]))
    dist = (1.0 + c) * (1.0 + rng.random(2))
    origin = 3.0 + dist
    cos = 1.0 / (1.0 + 0.2 * dist)
    w.write("dist_init_layer", reg, dist)
    w.write("dist_origin_layer", reg, origin)
    w.write("cos_init_layer", reg, cos)
    tot = np.sqrt(np.sum(dist**2))
    w.write("dist_init", reg, np.array([tot, dist[0], dist[1]]))
    w.write("dist_origin", reg, np.array([np.sqrt(np.sum(origin**2)), origin[0], origin[1]]))
    w.write("cos_init", reg, np.array([cos.mean(), cos[0], cos[1]]))


def noise_model_replicate(seed: np.random.SeedSequence, *, n_boot: int = 999) -> Any:
    """One replicate of the noise-model calibration design (tests and ``benchmarks/calibrate_noise_model.py``).

    An exact pool (‖G‖² = 1, tr Σ = 16, n = 512, d = 8) from ``seed``'s first child, 200 trials of N = 64 drawn
    without replacement from its second, and the fit over m = 1…64 with a BCa bootstrap from its third; returns
    the :class:`~gradlab.analysis.noise_model.NoiseModelFit`.
    """
    from gradlab.analysis.noise_model import fit_noise_model

    s_pool, s_draw, s_boot = seed.spawn(3)
    pool = make_pool(1.0, 16.0, 512, 8, np.random.default_rng(s_pool))
    rng = np.random.default_rng(s_draw)
    index = np.stack([rng.permutation(512)[:64] for _ in range(200)])
    m = np.array([1, 2, 4, 8, 16, 32, 64])
    return fit_noise_model(minibatch_sq_norms(pool, index, m), m, pool_size=512, replacement=False, n_boot=n_boot,
                           rng=np.random.default_rng(s_boot))
