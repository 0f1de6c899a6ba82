"""The layout of a sharpness store: dims, coords, variables (see :mod:`gradlab.curvature.config` for the table)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.curvature.config import (SharpnessConfig, _meta_float, _Prepared, _run_id, applied_lr)
from gradlab.curvature.hutchinson import trace_sample_count
from gradlab.curvature.interpolation import BN_BUFFERS
from gradlab.schema.sharpness import sharpness_variables
from gradlab.task import task_record


def alphas_for(config: SharpnessConfig) -> np.ndarray:
    """α grid of the parametric plot: linspace(−1, 2, alpha_points) (contains 0 and 1 when points ≡ 1 mod 3)."""
    return np.linspace(-1.0, 2.0, config.alpha_points)


def _spaces(config: SharpnessConfig) -> list[str]:
    return ["full"] if config.subspace_dim is None else ["full", "subspace"]


def _template(config: SharpnessConfig, prep: _Prepared) -> dict[str, Any]:
    C = len(prep.labels)
    n_probe = trace_sample_count(config.trace_estimator, config.hutchinson_probes)
    sizes = {"checkpoint": C, "k": config.top_k, "probe": n_probe, "eps": len(config.eps),
             "space": len(_spaces(config)), "example": len(prep.sample_index)}
    v = sharpness_variables(minibatch=bool(config.minibatch_sizes), interpolate=config.interpolate is not None)
    coords: dict[str, Any] = {
        "checkpoint": ("checkpoint", np.array(prep.labels, dtype=object), {"long_name": "checkpoint", "units": ""}),
        "checkpoint_path": ("checkpoint", np.array([str(Path(p).resolve()) for p in config.checkpoints], dtype=object),
                            {"long_name": "checkpoint file", "units": ""}),
        "checkpoint_epoch": ("checkpoint", np.array([_meta_float(m, "epoch") for m in prep.metas]),
                             {"long_name": "epoch of the checkpoint", "units": "epoch"}),
        "train_batch_size": ("checkpoint", np.array([_meta_float(m, "batch_size") for m in prep.metas]),
                             {"long_name": "training batch size m", "units": "examples"}),
        "train_lr": ("checkpoint", np.array([applied_lr(m)[0] for m in prep.metas]),
                     {"long_name": "learning rate eta applied at the checkpoint (mean-reduction units)", "units": "1"}),
        "train_lr_source": ("checkpoint", np.array([applied_lr(m)[1] for m in prep.metas], dtype=object),
                            {"long_name": "where train_lr comes from", "units": ""}),
        "train_lr_base": ("checkpoint", np.array([_meta_float(m, "lr") for m in prep.metas]),
                          {"long_name": "base learning rate of the run (before scaling and schedule)", "units": "1"}),
        "train_optimizer": ("checkpoint", np.array([str(m.get("optimizer", "unknown")) for m in prep.metas],
                                                   dtype=object), {"long_name": "training optimizer", "units": ""}),
        "run_id": ("checkpoint", np.array([_run_id(m, Path(p)) for m, p in zip(prep.metas, config.checkpoints)],
                                          dtype=object), {"long_name": "training run", "units": ""}),
        "n_params": ("checkpoint", np.array(prep.n_params, dtype=np.int64),
                     {"long_name": "number of parameters", "units": "1"}),
        "k": ("k", np.arange(config.top_k), {"long_name": "eigenvalue index (0 = largest)", "units": "1"}),
        "probe": ("probe", np.arange(n_probe),
                  {"long_name": "trace probe (Hutchinson, or Hutch++ remainder probe)", "units": "1"}),
        "eps": ("eps", np.array(config.eps, dtype=np.float64),
                {"long_name": "epsilon (box half-width relative to |theta_i|+1)", "units": "1"}),
        "space": ("space", np.array(_spaces(config), dtype=object),
                  {"long_name": "maximisation space (full or random subspace)", "units": ""}),
        "example": ("example", np.arange(len(prep.sample_index)), {"long_name": "position in the sample",
                                                                    "units": "1"}),
        "sample_index": ("example", np.asarray(prep.sample_index, dtype=np.int64),
                         {"long_name": "training-set index of the sample's example", "units": "1"}),
    }
    if config.minibatch_sizes:
        sizes.update(batch_size=len(config.minibatch_sizes), trial=config.minibatch_trials)
        coords["batch_size"] = ("batch_size", np.array(config.minibatch_sizes, dtype=np.int64),
                                {"long_name": "mini-batch size m", "units": "examples"})
        coords["trial"] = ("trial", np.arange(config.minibatch_trials), {"long_name": "trial", "units": "1"})
    if config.interpolate is not None:
        sizes["alpha"] = config.alpha_points
        coords["alpha"] = ("alpha", alphas_for(config),
                           {"long_name": "interpolation alpha: (1-alpha)*small + alpha*large", "units": "1"})
    attrs = {
        "bn_mode": config.bn_mode if prep.batch_norm else f"{config.bn_mode} (no batch norm in the model)",
        "bn_batch": config.chunk_size if config.bn_mode == "train" else 0,
        "dtype": config.dtype,
        "loss": config.loss,
        "task": task_record(data=config.data, loss=config.loss, model=config.model, collate=config.collate),
        "sample": "whole training set" if config.samples is None else f"{len(prep.sample_index)} examples",
        "dataset": config.data,
        "seed": config.seed,
        "lanczos_tol": config.resolved_lanczos_tol(),
        "lbfgs_maxiter": config.lbfgs_maxiter,
        "eps_start": "first-order corner y0 = sign(grad)*half-widths",
        "subspace_box": "z = A y, A n x p with iid N(0,1) entries; |y_j| <= eps*(|(pinv(A) theta)_j| + 1) (Keskar)",
        "trace_estimator": config.trace_estimator,
        "hutchinson": ("Rademacher probes; stderr = std(ddof=1)/sqrt(P)" if config.trace_estimator == "hutchinson"
                       else "Hutch++ (Meyer et al. 2021): k = floor(P/3) sketch, tr(Q^T H Q) exact, P - 2k "
                            "Rademacher remainder probes; stderr = std(ddof=1)/sqrt(P - 2k)"),
    }
    if config.interpolate is not None:
        attrs["interp_bn_buffers"] = BN_BUFFERS
        attrs["interp_small"] = str(Path(config.interpolate[0]).resolve())
        attrs["interp_large"] = str(Path(config.interpolate[1]).resolve())
    return {"sizes": sizes, "coords": coords, "variables": v, "attrs": attrs}


def config_dict(config: SharpnessConfig) -> dict[str, Any]:
    """The JSON-able config stored (paths resolved so that a resume from another folder matches)."""
    d = asdict(config)
    d["checkpoints"] = [str(Path(p).resolve()) for p in config.checkpoints]
    if config.interpolate is not None:
        d["interpolate"] = [str(Path(p).resolve()) for p in config.interpolate]
    d["lanczos_tol"] = config.resolved_lanczos_tol()
    return d
