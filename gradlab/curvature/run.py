"""Orchestration: checkpoints → curvature measurements → a resumable ``sharpness`` zarr store.

Everything the user can get wrong is checked *before* the store is created (ε ≤ 0, a subspace larger than the
parameter count, batch sizes larger than the sample, a loss that is not twice differentiable, non-finite
loss, gradient or curvature at any checkpoint): a refused run leaves nothing on disk.

Store (``gradlab_store = "sharpness"``), dims and variables:

==============================  ================================  ==================================================
name                            dims                              meaning
==============================  ================================  ==================================================
sample_index (coord)            example                           training-set indices of the fixed sample
train_batch_size, train_lr,     checkpoint                        from checkpoint meta (NaN / "unknown" when absent)
train_optimizer, checkpoint_
epoch, run_id, checkpoint_path
train_loss, train_accuracy,     checkpoint                        evaluated in eval mode on the whole split
test_loss, test_accuracy
sample_loss, grad_norm          checkpoint                        L and ‖∇L‖ over the sample (the measured loss)
lambda_max                      checkpoint                        largest Hessian eigenvalue (Lanczos)
eigenvalues, eigen_residual     checkpoint, k                     top-k eigenvalues and ‖Hv − λv‖
lanczos_hvps                    checkpoint                        HVPs Lanczos used (residual checks excluded)
hessian_trace(_stderr)          checkpoint                        Hutchinson estimate and its standard error
trace_samples                   checkpoint, probe                 vᵀHv per Rademacher probe
eps_sharpness, eps_loss_max     checkpoint, space, eps            Keskar's φ (%) and the max loss found
minibatch_lambda_max            checkpoint, batch_size, trial     λ_max of mini-batch Hessians (with sizes given)
minibatch_lambda_full(_stderr)  checkpoint                        extrapolation λ_full + c·x_m, and c
minibatch_slope
interp_{train,test}_{loss,      alpha                             Keskar's parametric plot (with --interpolate)
accuracy}
==============================  ================================  ==================================================

Seeds: the sample comes from ``SeedSequence([seed, 1])``; every other random draw of checkpoint c from
``SeedSequence([seed, tag, c, ...])`` with a fixed tag per quantity, so a resumed unit writes the same bytes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlab.checkpoint import build_model_from, load_checkpoint
from gradlab.curvature.eps_sharpness import eps_sharpness, validate_eps
from gradlab.curvature.evaluate import evaluate
from gradlab.curvature.hutchinson import TRACE_ESTIMATORS, trace_sample_count
from gradlab.curvature.hvp import (BN_MODES, SampleObjective, check_twice_differentiable, has_batch_norm,
                                   objective_loss)
from gradlab.curvature.interpolation import BN_BUFFERS, check_compatible, parametric_curve
from gradlab.curvature.lanczos import top_eigenvalues
from gradlab.curvature.minibatch import Extrapolation, extrapolate_full_batch, minibatch_lambda_max
from gradlab.errors import UsageError
from gradlab.store import VarSpec, create_store, writer_for
from gradlab.task import check_task, task_record

log = logging.getLogger(__name__)

STORE_KIND = "sharpness"
HESSIAN_UNITS = "loss / parameter^2"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CACHE_GRAPH: dict[str, bool | str] = {"auto": "auto", "yes": True, "no": False}
# Seed tags: one stream per quantity.
TAG_SAMPLE, TAG_PREFLIGHT, TAG_LANCZOS, TAG_HUTCHINSON, TAG_EPS = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SharpnessConfig:
    """The resolved configuration of one ``gradlab sharpness`` run (stored as JSON in the store's attrs)."""

    checkpoints: tuple[str, ...]
    data: str = "digits"
    data_root: str | None = None
    samples: int | None = 1024  # None: the whole training set
    top_k: int = 5
    hutchinson_probes: int = 50  # the trace's HVP budget
    trace_estimator: str = "hutchinson"  # or "hutch++"
    eps: tuple[float, ...] = (1e-3, 5e-4)
    subspace_dim: int | None = None
    minibatch_sizes: tuple[int, ...] = ()
    minibatch_trials: int = 10
    interpolate: tuple[str, str] | None = None
    alpha_points: int = 31  # α = linspace(-1, 2, alpha_points)
    bn_mode: str = "eval"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    chunk_size: int = 512
    cache_graph: str = "auto"  # keep the gradient's graph between HVPs: auto (one chunk), yes, no
    lanczos_tol: float | None = None  # None: 1e-9 in float64, 1e-5 in float32
    lbfgs_maxiter: int = 10
    model: str | None = None
    loss: str | None = None  # a task loss (gradlab.task: cross-entropy, mse, lm, pkg.module:fn); None: the data's
    model_kwargs: dict[str, Any] | None = None
    collate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_lanczos_tol(self) -> float:
        if self.lanczos_tol is not None:
            return float(self.lanczos_tol)
        return 1e-9 if self.dtype == "float64" else 1e-5


@dataclass
class _Prepared:
    """Everything validated and loaded before the store is created."""

    data: Any
    sample_index: np.ndarray
    models: list[torch.nn.Module]
    labels: list[str]
    metas: list[dict[str, Any]]
    n_params: list[int]
    batch_norm: bool
    interp_states: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None
    interp_template: torch.nn.Module | None


def _label(path: Path, meta: dict[str, Any], seen: set[str]) -> str:
    base = str(meta.get("tag") or path.stem)
    label, i = base, 1
    while label in seen:
        i += 1
        label = f"{base}-{i}"
    seen.add(label)
    return label


def _meta_float(meta: dict[str, Any], key: str) -> float:
    try:
        return float(meta[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def _run_id(meta: dict[str, Any], path: Path) -> str:
    keys = ("dataset", "batch_size", "lr", "lr_rule", "optimizer", "seed")
    if not any(k in meta for k in keys):
        return str(path.parent)
    return ",".join(f"{k}={meta.get(k)}" for k in keys)


def validate(config: SharpnessConfig) -> None:
    """Checks that need no data: flags in range, dtype/device/bn mode known."""
    if not config.checkpoints:
        raise UsageError("give at least one --checkpoint PATH")
    if config.bn_mode not in BN_MODES:
        raise UsageError(f"--bn-mode must be one of {BN_MODES}, got {config.bn_mode!r}")
    if config.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked but torch sees no CUDA device; use --device cpu")
    if config.samples is not None and config.samples < 2:
        raise UsageError(f"--samples must be at least 2, got {config.samples}")
    if config.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {config.top_k}")
    if config.hutchinson_probes < 2:
        raise UsageError(f"--hutchinson-probes must be >= 2 (a standard error needs two), got "
                         f"{config.hutchinson_probes}")
    if config.cache_graph not in CACHE_GRAPH:
        raise UsageError(f"--cache-graph must be one of {sorted(CACHE_GRAPH)}, got {config.cache_graph!r}")
    if config.trace_estimator not in TRACE_ESTIMATORS:
        raise UsageError(f"--trace-estimator must be one of {sorted(TRACE_ESTIMATORS)}, "
                         f"got {config.trace_estimator!r}")
    if config.trace_estimator == "hutch++" and config.hutchinson_probes < 4:
        raise UsageError(f"--trace-estimator hutch++ needs --hutchinson-probes >= 4 (a sketch and two remainder "
                         f"probes), got {config.hutchinson_probes}")
    if not config.eps:
        raise UsageError("give at least one --eps value (Keskar used 1e-3,5e-4)")
    for e in config.eps:
        validate_eps(e, None, 1)
    if len(set(config.eps)) != len(config.eps):
        raise UsageError(f"--eps values must be distinct, got {list(config.eps)}")
    if config.subspace_dim is not None and config.subspace_dim < 1:
        raise UsageError(f"--subspace-dim must be >= 1, got {config.subspace_dim}")
    if config.minibatch_sizes and config.minibatch_trials < 1:
        raise UsageError(f"--minibatch-trials must be >= 1, got {config.minibatch_trials}")
    if len(set(config.minibatch_sizes)) != len(config.minibatch_sizes) or any(m < 1 for m in config.minibatch_sizes):
        raise UsageError(f"--minibatch-sizes must be distinct positive integers, got {list(config.minibatch_sizes)}")
    if config.alpha_points < 2:
        raise UsageError(f"need at least 2 interpolation points, got {config.alpha_points}")
    if config.chunk_size < 1 or config.lbfgs_maxiter < 1:
        raise UsageError("--chunk-size and --lbfgs-iters must be >= 1")


def prepare(config: SharpnessConfig) -> _Prepared:
    """Load data and checkpoints and refuse anything that would fail later; writes nothing."""
    from gradlab.datasets import load_data

    validate(config)
    data = load_data(config.data, root=config.data_root, collate=config.collate)
    if config.loss is None:
        import dataclasses

        config = dataclasses.replace(config, loss="cross_entropy" if data.loss == "cross-entropy" else data.loss)
    n_train = len(data.train)
    if config.samples is None:
        sample_index = np.arange(n_train)
    else:
        if config.samples > n_train:
            raise UsageError(f"--samples {config.samples} exceeds the {n_train} training examples of {config.data}; "
                             "lower it or pass --full")
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, TAG_SAMPLE]))
        sample_index = np.sort(rng.choice(n_train, size=config.samples, replace=False))
    n_sample = len(sample_index)
    bad = [m for m in config.minibatch_sizes if m > n_sample]
    if bad:
        raise UsageError(f"--minibatch-sizes {bad} exceed the sample of {n_sample} examples; lower them or raise "
                         "--samples")
    models, labels, metas, n_params, seen = [], [], [], [], set()
    for path in config.checkpoints:
        ckpt = load_checkpoint(path)
        net = build_model_from(ckpt, model=config.model, model_kwargs=config.model_kwargs,
                               input_shape=data.input_shape, n_classes=data.n_classes)
        if not models:
            check_task(net, objective_loss(config.loss), data.train, name=config.loss, dtype=DTYPES[config.dtype])
        n = sum(p.numel() for p in net.parameters() if p.requires_grad)
        if config.top_k > n:
            raise UsageError(f"--top-k {config.top_k} exceeds the {n} parameters of {path}")
        for e in config.eps:
            validate_eps(e, config.subspace_dim, n)
        models.append(net)
        metas.append(dict(ckpt.meta))
        labels.append(_label(Path(path), ckpt.meta, seen))
        n_params.append(int(n))
    prep = _Prepared(data, sample_index, models, labels, metas, n_params,
                     any(has_batch_norm(m) for m in models), None, None)
    if config.interpolate is not None:
        small, large = (load_checkpoint(p) for p in config.interpolate)
        check_compatible(small.state_dict, large.state_dict)
        prep.interp_template = build_model_from(small, model=config.model, model_kwargs=config.model_kwargs,
                                                input_shape=data.input_shape, n_classes=data.n_classes)
        prep.interp_states = (dict(small.state_dict), dict(large.state_dict))
    for c, net in enumerate(models):
        obj = _objective(config, prep, net, sample_index)
        try:
            check_twice_differentiable(obj, np.random.default_rng(np.random.SeedSequence([config.seed,
                                                                                          TAG_PREFLIGHT, c])))
        except UsageError as exc:
            raise type(exc)(f"{config.checkpoints[c]}: {exc}") from None
    return prep


def _objective(config: SharpnessConfig, prep: _Prepared, net: torch.nn.Module, index: np.ndarray) -> SampleObjective:
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return SampleObjective(net, prep.data.train[idx], loss=config.loss,
                           dtype=DTYPES[config.dtype], device=config.device, chunk_size=config.chunk_size,
                           bn_mode=config.bn_mode, cache_graph=CACHE_GRAPH[config.cache_graph])


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
    per = ("checkpoint",)
    H = HESSIAN_UNITS
    v = [
        VarSpec("train_loss", per, "float64", "training loss (whole training set, eval mode)", "loss"),
        VarSpec("train_accuracy", per, "float64", "training accuracy (whole training set)", "1"),
        VarSpec("test_loss", per, "float64", "test loss (whole test set, eval mode)", "loss"),
        VarSpec("test_accuracy", per, "float64", "test accuracy (whole test set)", "1"),
        VarSpec("sample_loss", per, "float64", "training loss L over the fixed sample", "loss"),
        VarSpec("grad_norm", per, "float64", "norm of the gradient of L over the sample", "loss / parameter"),
        VarSpec("lambda_max", per, "float64", "largest Hessian eigenvalue lambda_max (Lanczos)", H),
        VarSpec("eigenvalues", ("checkpoint", "k"), "float64", "top-k Hessian eigenvalues (Lanczos)", H),
        VarSpec("eigen_residual", ("checkpoint", "k"), "float64", "eigenpair residual norm ||Hv - lambda v||", H),
        VarSpec("lanczos_hvps", per, "int64", "Hessian-vector products used by Lanczos", "1"),
        VarSpec("lanczos_converged", per, "bool", "Lanczos met its tolerance", "1"),
        VarSpec("hessian_trace", per, "float64", "Hessian trace (Hutchinson or Hutch++, Rademacher probes)", H),
        VarSpec("hessian_trace_stderr", per, "float64", "standard error of the trace estimate", H),
        VarSpec("trace_samples", ("checkpoint", "probe"), "float64",
                "per-probe trace sample (v^T H v; Hutch++: tr(Q^T H Q) + deflated g^T H g)", H),
        VarSpec("eps_sharpness", ("checkpoint", "space", "eps"), "float64",
                "epsilon-sharpness phi (Keskar et al. 2017, Metric 2.1)", "%"),
        VarSpec("eps_loss_max", ("checkpoint", "space", "eps"), "float64",
                "largest loss found in the epsilon box (L-BFGS-B)", "loss"),
        VarSpec("eps_n_evals", ("checkpoint", "space", "eps"), "int64", "loss evaluations used by L-BFGS-B", "1"),
    ]
    coords: dict[str, Any] = {
        "checkpoint": ("checkpoint", np.array(prep.labels, dtype=object), {"long_name": "checkpoint", "units": ""}),
        "checkpoint_path": ("checkpoint", np.array([str(Path(p).resolve()) for p in config.checkpoints], dtype=object),
                            {"long_name": "checkpoint file", "units": ""}),
        "checkpoint_epoch": ("checkpoint", np.array([_meta_float(m, "epoch") for m in prep.metas]),
                             {"long_name": "epoch of the checkpoint", "units": "epoch"}),
        "train_batch_size": ("checkpoint", np.array([_meta_float(m, "batch_size") for m in prep.metas]),
                             {"long_name": "training batch size m", "units": "examples"}),
        "train_lr": ("checkpoint", np.array([_meta_float(m, "lr") for m in prep.metas]),
                     {"long_name": "training learning rate eta", "units": "1"}),
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
        v += [
            VarSpec("minibatch_lambda_max", ("checkpoint", "batch_size", "trial"), "float64",
                    "lambda_max of the mini-batch Hessian", H),
            VarSpec("minibatch_lambda_full", per, "float64", "full-batch lambda_max extrapolated from mini-batches", H,
                    attrs={"model": Extrapolation(0, 0, 0, 0).model}),
            VarSpec("minibatch_lambda_full_stderr", per, "float64", "standard error of the extrapolated lambda_max",
                    H),
            VarSpec("minibatch_slope", per, "float64", "slope c of lambda_max(m) = lambda_full + c*x_m", H),
        ]
    if config.interpolate is not None:
        sizes["alpha"] = config.alpha_points
        coords["alpha"] = ("alpha", alphas_for(config),
                           {"long_name": "interpolation alpha: (1-alpha)*small + alpha*large", "units": "1"})
        for s in ("train", "test"):
            v += [VarSpec(f"interp_{s}_loss", ("alpha",), "float64", f"{s} loss along the interpolation", "loss"),
                  VarSpec(f"interp_{s}_accuracy", ("alpha",), "float64", f"{s} accuracy along the interpolation",
                          "1")]
        v.append(VarSpec("interp_done", ("alpha",), "bool", "interpolation point finished", "1"))
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


def run_sharpness(
    config: SharpnessConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Validate, create (or resume) the store at ``out``, and measure every unfinished checkpoint."""
    out = Path(out)
    if out.exists() and not resume:
        raise UsageError(f"{out} already exists; pass --resume to continue it, or choose another --out")
    prep = prepare(config)
    if config.loss is None:  # the data's own loss; "cross_entropy" keeps the store of a classification unchanged
        import dataclasses

        config = dataclasses.replace(config, loss="cross_entropy" if prep.data.loss == "cross-entropy"
                                     else prep.data.loss)
    tmpl = _template(config, prep)
    cfg = config_dict(config)

    def create() -> None:
        create_store(out, kind=STORE_KIND, sizes=tmpl["sizes"], coords=tmpl["coords"], variables=tmpl["variables"],
                     unit_dims=["checkpoint"], chunks={"checkpoint": 1}, config=cfg, attrs=tmpl["attrs"])

    from tqdm import tqdm

    bar = tqdm(desc="Hessian-vector products", unit="HVP", file=sys.stderr, disable=progress is None, leave=False)

    def say(msg: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            (progress or log.info)(msg)

    with bar, writer_for(out, resume=resume, config=cfg, create=create) as writer:
        done = writer.done()
        for c, label in enumerate(prep.labels):
            if done[c]:
                say(f"checkpoint {label}: already done")
                continue
            say(f"checkpoint {label}: measuring ({prep.n_params[c]} parameters)")
            for name, values in _measure_checkpoint(config, prep, c, say, bar.update).items():
                writer.write(name, {"checkpoint": c}, values)
            writer.mark_done({"checkpoint": c})
        if config.interpolate is not None and not bool(writer.read("interp_done").all()):
            say("interpolation: evaluating")
            splits = {"train": prep.data.train.batch}
            if prep.data.test is not None:
                splits["test"] = prep.data.test.batch
            small, large = prep.interp_states  # type: ignore[misc]
            curve = parametric_curve(prep.interp_template, small, large, alphas_for(config), splits,  # type: ignore[arg-type]
                                     loss=config.loss, dtype=DTYPES[config.dtype], device=config.device)
            for key, values in curve.items():
                writer.write(f"interp_{key}", {}, values)
            writer.write("interp_done", {}, np.ones(config.alpha_points, dtype=bool))
    return out


def _measure_checkpoint(config: SharpnessConfig, prep: _Prepared, c: int, say: Callable[[str], None],
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
               lanczos_hvps=eig.n_hvp, lanczos_converged=eig.converged)
    say(f"  lambda_max = {eig.eigenvalues[0]:.6g} ({eig.n_hvp} HVPs)")
    trace_rng = np.random.default_rng(np.random.SeedSequence([config.seed, TAG_HUTCHINSON, c]))
    tr = TRACE_ESTIMATORS[config.trace_estimator](_np_matvec(obj, tick), obj.n_params, config.hutchinson_probes,
                                                  rng=trace_rng)
    res.update(hessian_trace=tr.trace, hessian_trace_stderr=tr.stderr, trace_samples=tr.samples)
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
