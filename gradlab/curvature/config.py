"""The resolved config of ``gradlab sharpness`` and everything checked and loaded before its store exists.

Orchestration: checkpoints → curvature measurements → a resumable ``sharpness`` zarr store (run by the one
runner, :mod:`gradlab.runner`; the job is :class:`gradlab.curvature.job.SharpnessJob`).

Everything the user can get wrong is checked *before* the store is created (ε ≤ 0, a subspace larger than the
parameter count, batch sizes larger than the sample, a loss that is not twice differentiable, non-finite
loss, gradient or curvature at any checkpoint): a refused run leaves nothing on disk.

Store (``gradlab_store = "sharpness"``), dims and variables:

==============================  ================================  ==================================================
name                            dims                              meaning
==============================  ================================  ==================================================
sample_index (coord)            example                           training-set indices of the fixed sample
train_batch_size, train_lr,     checkpoint                        from checkpoint meta (NaN / "unknown" when absent);
                                                                  train_lr is the rate applied at the checkpoint
                                                                  (``applied_lr``), train_lr_base the run's base lr
train_optimizer, checkpoint_
epoch, run_id, checkpoint_path
train_loss, train_accuracy,     checkpoint                        evaluated in eval mode on the whole split
test_loss, test_accuracy
sample_loss, grad_norm          checkpoint                        L and ‖∇L‖ over the sample (the measured loss)
lambda_max                      checkpoint                        largest Hessian eigenvalue (Lanczos)
eigenvalues, eigen_residual     checkpoint, k                     top-k eigenvalues and ‖Hv − λv‖
lanczos_hvps                    checkpoint                        HVPs Lanczos used (residual checks excluded)
lanczos_check, lanczos_missed_  checkpoint                        deflated check run's top Ritz value (≤ λ_max) and
top                                                               whether it exposed a missed larger eigenvalue
hessian_trace(_stderr)          checkpoint                        Hutchinson estimate and its standard error
trace_samples                   checkpoint, probe                 vᵀHv per Rademacher probe (NaN past the probes used:
                                                                  by default probes run until the SE ≤ 2% of |tr H|)
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

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlab.checkpoint import build_model_from, load_checkpoint, require_finite
from gradlab.curvature.eps_sharpness import validate_eps
from gradlab.curvature.hutchinson import TRACE_ESTIMATORS
from gradlab.curvature.hvp import (BN_MODES, SampleObjective, check_twice_differentiable, has_batch_norm,
                                   objective_loss)
from gradlab.curvature.interpolation import check_compatible
from gradlab.devices import check_device
from gradlab.errors import UsageError
from gradlab.task import check_task

log = logging.getLogger(__name__)

STORE_KIND = "sharpness"
from gradlab.schema.sharpness import HESSIAN_UNITS  # noqa: E402 - one spelling, in the schema
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
    hutchinson_probes: int | None = None  # the trace's HVP budget; None: Hutchinson until its SE ≤ 2% of |tr H|
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


def applied_lr(meta: dict[str, Any]) -> tuple[float, str]:
    """The learning rate η applied at a checkpoint, in mean-reduction units, and where it came from.

    ``lr_applied`` (gradlab train records the rate of the last step after the rule's batch-size scaling, warmup,
    decay and cycle) times m under sum reduction (the update η̃·Σᵢgᵢ is mean reduction with η = η̃·m); else the
    rule recorded in ``lr_rule`` evaluated at the checkpoint's step; else the meta's ``lr`` when no rule scales it
    (a hand-written checkpoint); else NaN.  Returns (η, source)."""
    m = _meta_float(meta, "batch_size")
    rule = meta.get("lr_rule")
    if "lr_applied" in meta:
        eta, reduction, source = _meta_float(meta, "lr_applied"), str(meta.get("reduction", "mean")), "lr_applied"
    elif isinstance(rule, dict) and "epoch" in meta and "step" in meta:
        from dataclasses import fields

        from gradlab.lr_rules import LRRule

        keys = {f.name for f in fields(LRRule)}
        try:
            r = LRRule(**{k: (tuple(v) if k == "decay_epochs" else v) for k, v in rule.items() if k in keys})
            step, epoch = int(meta["step"]), float(meta["epoch"])
            spe = max(int(round(step / epoch)), 1) if epoch > 0 else 1
            eta, reduction, source = r.lr_at(max(step - 1, 0), spe), r.reduction, "lr_rule at the checkpoint's step"
        except Exception:  # noqa: BLE001 - a foreign or damaged rule: say so rather than guess
            return math.nan, "unreadable lr_rule"
    elif "lr" in meta and not isinstance(rule, dict):
        eta, reduction, source = _meta_float(meta, "lr"), str(meta.get("reduction", "mean")), "lr (no rule recorded)"
    else:
        return math.nan, "unknown"
    return (eta * m if reduction == "sum" else eta), source


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
    check_device(config.device)
    if config.samples is not None and config.samples < 2:
        raise UsageError(f"--samples must be at least 2, got {config.samples}")
    if config.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {config.top_k}")
    if config.hutchinson_probes is not None and config.hutchinson_probes < 2:
        raise UsageError(f"--hutchinson-probes must be >= 2 (a standard error needs two), got "
                         f"{config.hutchinson_probes}")
    if config.cache_graph not in CACHE_GRAPH:
        raise UsageError(f"--cache-graph must be one of {sorted(CACHE_GRAPH)}, got {config.cache_graph!r}")
    if config.trace_estimator not in TRACE_ESTIMATORS:
        raise UsageError(f"--trace-estimator must be one of {sorted(TRACE_ESTIMATORS)}, "
                         f"got {config.trace_estimator!r}")
    if config.trace_estimator == "hutch++" and (config.hutchinson_probes or 50) < 4:
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
        if config.samples is None:
            raise UsageError(f"--minibatch-sizes {bad} exceed the {n_sample} training examples of {config.data} "
                             "(--full uses them all); lower them")
        raise UsageError(f"--minibatch-sizes {bad} exceed the sample of {n_sample} examples; lower them or raise "
                         f"--samples (at most {n_train}, or --full)")
    models, labels, metas, n_params, seen = [], [], [], [], set()
    for path in config.checkpoints:
        ckpt = load_checkpoint(path)
        require_finite(ckpt.state_dict, str(path))
        net = build_model_from(ckpt, model=config.model, model_kwargs=config.model_kwargs,
                               input_shape=data.input_shape, n_classes=data.n_classes)
        if not models:
            check_task(net, objective_loss(config.loss), data.train, name=config.loss, dtype=DTYPES[config.dtype])
            if config.bn_mode == "train":
                _check_bn_batches(config, net, data, n_sample)
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
        for ck in (small, large):
            require_finite(ck.state_dict, str(ck.path))
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


def _check_bn_batches(config: SharpnessConfig, net: torch.nn.Module, data: Any, n_sample: int) -> None:
    """Refuse ``--bn-mode train`` when a batch-norm batch would hold a single example (one value per channel):
    batch norm then normalises each ``--chunk-size`` chunk of the sample, and of each mini-batch, on its own."""
    from gradlab.task import single_example_batch_norm

    chunk = config.chunk_size

    def pieces(n: int) -> set[int]:
        return {min(n, chunk)} | ({n % chunk} if n > chunk and n % chunk else set())

    sample, minis = pieces(n_sample), {m: pieces(m) for m in config.minibatch_sizes}
    sizes = sample.union(*minis.values())
    failing = set(single_example_batch_norm(net, objective_loss(config.loss), data.train, sorted(sizes),
                                            dtype=DTYPES[config.dtype]))
    if not failing:
        return
    from gradlab.store import option

    why = (f"{option('bn_mode', 'train')} normalises each batch with its own statistics, which needs at least 2 "
           "examples per batch-norm batch")
    fix = f"or use {option('bn_mode', 'eval')} (running statistics)"
    bad = [m for m, ps in minis.items() if ps & failing]
    if bad:
        m = bad[0]
        where = (f"batch size {m} in {option('minibatch_sizes')}" if m <= chunk else
                 f"batch size {m} in {option('minibatch_sizes')} leaves a last {option('chunk_size')} {chunk} chunk "
                 "of one example")
        raise UsageError(f"{why}: {where}; drop it, {fix}")
    raise UsageError(f"{why}: the sample of {n_sample} examples in {option('chunk_size')} {chunk} chunks leaves a "
                     f"last chunk of one example; change {option('samples')} or {option('chunk_size')}, {fix}")


def _objective(config: SharpnessConfig, prep: _Prepared, net: torch.nn.Module, index: np.ndarray) -> SampleObjective:
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return SampleObjective(net, prep.data.train[idx], loss=config.loss,
                           dtype=DTYPES[config.dtype], device=config.device, chunk_size=config.chunk_size,
                           bn_mode=config.bn_mode, cache_graph=CACHE_GRAPH[config.cache_graph])
