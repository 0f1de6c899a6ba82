"""The measurements of one checkpoint (one unit of a sharpness store): evaluation, λ_max and the top-k
eigenvalues (Lanczos), the Hessian trace (Hutchinson / Hutch++), ε-sharpness, mini-batch λ_max."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradlab.curvature.config import (DTYPES, TAG_EPS, TAG_HUTCHINSON, TAG_LANCZOS, SharpnessConfig, _objective,
                                      _Prepared)
from gradlab.curvature.eps_sharpness import eps_sharpness
from gradlab.curvature.evaluate import evaluate
from gradlab.curvature.hutchinson import (TRACE_ESTIMATORS, TRACE_MIN_PROBES, hutchinson_to_precision,
                                         trace_sample_count)
from gradlab.curvature.hvp import SampleObjective
from gradlab.curvature.layout import _spaces
from gradlab.curvature.lanczos import top_eigenvalues
from gradlab.curvature.minibatch import extrapolate_full_batch, minibatch_lambda_max


def _np_matvec(obj: SampleObjective, tick: Callable[[], Any] = lambda: None) -> Callable[[np.ndarray], np.ndarray]:
    """v ↦ H v on numpy float64 vectors; ``tick`` is called once per product (the progress bar)."""
    def mv(v: np.ndarray) -> np.ndarray:
        tick()
        return obj.hvp(torch.from_numpy(v)).double().cpu().numpy()

    return mv


def _np_value_and_grad(obj: SampleObjective) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        val, grad = obj.value_and_grad(torch.from_numpy(theta))
        return val, grad.double().cpu().numpy()
    return f


def measure_checkpoint(config: SharpnessConfig, prep: _Prepared, c: int, say: Callable[[str], None],
                        tick: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    net = prep.models[c]
    dtype = DTYPES[config.dtype]
    res: dict[str, Any] = {}
    res["train_loss"], res["train_accuracy"] = evaluate(net, prep.data.train.batch, loss=config.loss,
                                                        dtype=dtype, device=config.device)
    if prep.data.test is not None:
        res["test_loss"], res["test_accuracy"] = evaluate(net, prep.data.test.batch, loss=config.loss,
                                                          dtype=dtype, device=config.device)
    obj = _objective(config, prep, net, prep.sample_index)
    loss0, grad = obj.value_and_grad()
    res["sample_loss"], res["grad_norm"] = loss0, float(grad.norm())
    tol = config.resolved_lanczos_tol()
    eig = top_eigenvalues(_np_matvec(obj, tick), obj.n_params, config.top_k, tol=tol,
                          rng=np.random.default_rng(np.random.SeedSequence([config.seed, TAG_LANCZOS, c])))
    res.update(lambda_max=eig.eigenvalues[0], eigenvalues=eig.eigenvalues, eigen_residual=eig.residuals,
               lanczos_hvps=eig.n_hvp, lanczos_converged=eig.converged, lanczos_check=eig.check_eigenvalue,
               lanczos_missed_top=eig.missed_top)
    if eig.missed_top:
        say(f"  warning: a deflated Lanczos check found {eig.check_eigenvalue:.6g} > lambda_max: lambda_max is only "
            "a lower bound here")
    say(f"  lambda_max = {eig.eigenvalues[0]:.6g} ({eig.n_hvp} HVPs)")
    trace_rng = np.random.default_rng(np.random.SeedSequence([config.seed, TAG_HUTCHINSON, c]))
    if config.hutchinson_probes is None and config.trace_estimator == "hutchinson":
        tr = hutchinson_to_precision(_np_matvec(obj, tick), obj.n_params, rng=trace_rng)
    else:
        tr = TRACE_ESTIMATORS[config.trace_estimator](_np_matvec(obj, tick), obj.n_params,
                                                      config.hutchinson_probes or TRACE_MIN_PROBES, rng=trace_rng)
    n_slots = trace_sample_count(config.trace_estimator, config.hutchinson_probes)
    samples = np.full(n_slots, np.nan)
    samples[: tr.samples.size] = tr.samples
    res.update(hessian_trace=tr.trace, hessian_trace_stderr=tr.stderr, trace_samples=samples)
    say(f"  trace = {tr.trace:.6g} ± {tr.stderr:.2g}")
    theta = obj.theta0.double().cpu().numpy()
    spaces = _spaces(config)
    phi = np.full((len(spaces), len(config.eps)), np.nan)
    lmax = np.full_like(phi, np.nan)
    nev = np.zeros(phi.shape, dtype=np.int64)
    for s, space in enumerate(spaces):
        for e, eps in enumerate(config.eps):
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, TAG_EPS, c, s, e]))
            r = eps_sharpness(_np_value_and_grad(obj), theta, eps, rng=rng, maxiter=config.lbfgs_maxiter,
                              subspace_dim=config.subspace_dim if space == "subspace" else None)
            phi[s, e], lmax[s, e], nev[s, e] = r.phi, r.loss_max, r.n_evals
    res.update(eps_sharpness=phi, eps_loss_max=lmax, eps_n_evals=nev)
    say(f"  eps-sharpness = {np.array2string(phi, precision=4)} %")
    if config.minibatch_sizes:
        def lambda_of(idx: np.ndarray, rng: np.random.Generator) -> float:
            sub = _objective(config, prep, net, prep.sample_index[idx])
            return float(top_eigenvalues(_np_matvec(sub, tick), sub.n_params, 1, tol=tol, rng=rng).eigenvalues[0])

        vals = minibatch_lambda_max(lambda_of, len(prep.sample_index), config.minibatch_sizes,
                                    config.minibatch_trials, seed=config.seed, checkpoint=c)
        ext = extrapolate_full_batch(config.minibatch_sizes, vals, len(prep.sample_index))
        res.update(minibatch_lambda_max=vals, minibatch_lambda_full=ext.lambda_full,
                   minibatch_lambda_full_stderr=ext.lambda_full_stderr, minibatch_slope=ext.slope)
        if np.isfinite(ext.lambda_full):
            say(f"  mini-batch extrapolation: lambda_full = {ext.lambda_full:.6g} ± {ext.lambda_full_stderr:.2g}")
        else:
            say("  mini-batch extrapolation: not possible (it needs at least two distinct --minibatch-sizes with "
                "results); the per-size lambda_max values are stored")
    return res
