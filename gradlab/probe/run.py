"""Orchestration of ``gradlab probe``: resolve and validate a config, make the store, compute units, resume.

Data flow: checkpoints + data -> :func:`resolve_config` (every check, nothing written) -> :func:`run_probe`
(``gradlab.store.create_store`` template, then one *unit* at a time: a chunk-aligned block of trials of one
checkpoint, all batch sizes; each unit's variables are written into their region, then ``mark_done``) ->
:func:`finalize` (per-checkpoint variables: moment estimates and distances, rewritten from the stored trials on
every run, so resume and uninterrupted runs agree).

A unit's results depend only on (config, checkpoint index, trials): trial t of checkpoint c draws its examples from
``SeedSequence([seed, c, t])`` (:mod:`gradlab.probe.sampling`), so ``--resume`` (after ``kill -9`` too),
``--workers`` and ``--scheduler`` write the same values as one uninterrupted local run.

Protocols (SCIENCE.md "The two probe protocols"): ``step`` calls :func:`gradlab.probe.step.step_trials` once per
batch size for the unit's trials (train mode); ``frozen`` builds per-example Gram matrices
(:mod:`gradlab.probe.gram`, eval mode: batch norm uses running statistics so examples stay independent, dropout
off) and derives every batch size from them (:mod:`gradlab.probe.frozen`).  The frozen protocol's
``nonfinite_count`` is the number of non-finite entries of Σᵢ gᵢ over the selected tensors; the step protocol's
is the step engine's count over all steps and parameters.

Distributed: with ``workers`` (a local Dask cluster) or ``scheduler`` (an address), units are submitted with
``pure=False`` carrying the config (checkpoint paths, not models); the driver stays the single writer and writes
results as they complete, with at most two units per worker in flight so memory stays bounded.

Test hook: the environment variable ``GRADLAB_PROBE_KILL_AFTER`` = ``done:K`` (or ``write:K``) makes the driver
SIGKILL itself right after the K-th unit is marked done (or after its variables are written but before it is
marked done); the kill-and-resume tests use it to crash at a known point.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import UsageError
from gradlab.schema import GROUPS, entry_bin_edges, probe_variables
from gradlab.store import VarSpec

log = logging.getLogger(__name__)

PROTOCOLS = ("step", "frozen")
REDUCTIONS = ("mean", "sum")
KEEPS = ("norms", "histograms", "vectors")
DTYPES = ("float32", "float64")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # divisors of the default budget
UNIT_TARGET_TRIALS = 8
GRAD_SUM_CHUNK_BYTES = 256 * 2**20
SEED_DERIVATION = ("trial t of checkpoint c (0-based position in the checkpoint dim) draws its examples with "
                   "numpy.random.default_rng(numpy.random.SeedSequence([seed, c, t])).choice(pool_size, budget, "
                   "replace=replacement)")


@dataclass(frozen=True)
class CheckpointSpec:
    """One probed checkpoint: its label (the ``checkpoint`` coordinate), file, digest, epoch and init file."""

    label: str
    path: str
    sha256: str
    epoch: float
    init_path: str  # "" when no init is known (distances to init are NaN)
    init_sha256: str


@dataclass(frozen=True)
class ProbeConfig:
    """The resolved config of a probe: everything the numbers depend on (its JSON is hashed into the store)."""

    checkpoints: tuple[CheckpointSpec, ...]
    data: str
    model: str | None
    model_kwargs_json: str  # JSON text ("null": use each checkpoint's recipe)
    batch_sizes: tuple[int, ...]
    budget: int
    trials: int
    protocol: str
    reduction: str
    lr: float
    params: str
    keep: str
    seed: int
    device: str
    dtype: str
    replacement: bool
    trials_per_unit: int
    pool_size: int
    input_shape: tuple[int, ...]
    n_classes: int
    layers: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    selected: tuple[str, ...]
    loss: str = "cross-entropy"  # a built-in name or pkg.module:fn (gradlab.task)
    collate: str | None = None  # pkg.module:fn turning a Dataset's items into one batch (default_collate if None)
    loss_sha256: str = ""  # SHA-256 of a user loss's source ("" for built-ins)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoints"] = [asdict(c) for c in self.checkpoints]
        return d

    @property
    def model_kwargs(self) -> dict[str, Any] | None:
        return json.loads(self.model_kwargs_json)

    @property
    def model_mode(self) -> str:
        return "eval" if self.protocol == "frozen" else "train"

    @property
    def n_selected(self) -> int:
        return sum(s for n, s in zip(self.layers, self.layer_sizes) if n in self.selected)

    def units(self) -> list[tuple[int, int, int]]:
        """All units ``(checkpoint index, first trial, end trial)`` in order."""
        return [(c, t0, min(t0 + self.trials_per_unit, self.trials))
                for c in range(len(self.checkpoints)) for t0 in range(0, self.trials, self.trials_per_unit)]


# ---------------------------------------------------------------------------------------------------------------
# resolving and validating


def _sha256(path: Path) -> str:
    """SHA-256 of a checkpoint (a file, or a Hugging Face folder's config and weight files)."""
    from gradlab.checkpoint import checkpoint_sha256

    return checkpoint_sha256(path)


def parse_checkpoint_arg(arg: str) -> tuple[str, Path]:
    """``LABEL=PATH`` or ``PATH`` (label = the file stem)."""
    label, sep, path = arg.partition("=")
    if sep and label and not Path(arg).exists():
        return label, Path(path)
    return Path(arg).stem, Path(arg)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def resolve_config(
    checkpoints: Sequence[str],
    *,
    data: str,
    init: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    budget: int = 1024,
    trials: int = 100,
    protocol: str = "step",
    reduction: str = "mean",
    lr: float = 0.01,
    params: str = ".",
    keep: str = "histograms",
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    replacement: bool = False,
    trials_per_unit: int | None = None,
    loss: str | None = None,
    collate: str | None = None,
) -> ProbeConfig:
    """Check every input and resolve the full config; raise :class:`UsageError` (naming the fix) on bad input.

    Nothing is written.  Loads the data and every checkpoint (and init) to check that the weights fit the model,
    that all checkpoints share one parameter layout, and that ``params`` (a regex searched in parameter names)
    selects at least one tensor.
    """
    import torch

    from gradlab.checkpoint import build_model_from, load_checkpoint
    from gradlab.datasets import load_data
    from gradlab.probe.distance import find_init
    from gradlab.task import LOSSES, check_task, loss_name, resolve_loss, source_sha256

    _check_choice("protocol", protocol, PROTOCOLS)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("keep", keep, KEEPS)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("device", device, ("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu or a CUDA build of torch")
    if not checkpoints:
        raise UsageError("no checkpoint given; pass --checkpoint PATH (repeatable, or LABEL=PATH)")
    sizes = [int(m) for m in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if len(set(sizes)) != len(sizes):
        raise UsageError(f"batch sizes repeat: {sizes}; give each once")
    if budget < 1:
        raise UsageError(f"--budget must be >= 1, got {budget}")
    bad = [m for m in sizes if budget % m]
    if bad:
        raise UsageError(f"batch sizes {bad} do not divide the budget {budget}: every trial splits its {budget} "
                         "examples into budget/m minibatches; pick divisors of --budget or change --budget")
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    if seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed}")
    if not math.isfinite(lr):
        raise UsageError(f"--lr must be a finite number, got {lr}")
    try:
        pattern = re.compile(params)
    except re.error as exc:
        raise UsageError(f"--params {params!r} is not a valid regular expression: {exc}") from None

    if loss is not None:
        resolve_loss(loss)  # an unknown name fails before the data loads
    bundle = load_data(data, collate=collate)
    loss = loss_name(loss or bundle.loss)
    loss_fn = resolve_loss(loss)
    pool_size = len(bundle.train)
    if not replacement and budget > pool_size:
        raise UsageError(f"--budget {budget} exceeds the {pool_size} training examples of {data!r}; draws are without "
                         "replacement: lower --budget or pass --replacement")

    specs: list[CheckpointSpec] = []
    layout: list[tuple[str, tuple[int, ...]]] | None = None
    labels: set[str] = set()
    for arg in checkpoints:
        label, path = parse_checkpoint_arg(arg)
        if label in labels:
            raise UsageError(f"checkpoint label {label!r} is used twice; name them with LABEL=PATH")
        labels.add(label)
        ckpt = load_checkpoint(path)
        net = build_model_from(ckpt, model=model, model_kwargs=model_kwargs, input_shape=bundle.input_shape,
                               n_classes=bundle.n_classes)
        this = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
        if layout is None:
            layout = this
            if protocol == "step":
                for mod in net.modules():
                    if isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0:
                        raise UsageError(f"the model has active dropout ({type(mod).__name__}, p={mod.p}); the step "
                                         "probe needs a deterministic model: use --protocol frozen or dropout 0")
            check_task(net, loss_fn, bundle.train, name=loss, dtype=getattr(torch, dtype))
        elif this != layout:
            raise UsageError(f"{path} has parameters {this}, unlike the first checkpoint's {layout}; probe checkpoints "
                             "of one architecture per store")
        init_path = Path(init) if init else find_init(path)
        init_sha = ""
        if init_path is not None:
            ick = load_checkpoint(init_path)
            build_model_from(ick, model=model, model_kwargs=model_kwargs, input_shape=bundle.input_shape,
                             n_classes=bundle.n_classes)
            init_sha = _sha256(init_path)
        else:
            log.warning("no init checkpoint for %s (no --init and no checkpoint tagged 'init' beside it): distances "
                        "and cosines to init will be NaN", path)
        epoch = ckpt.meta.get("epoch")
        specs.append(CheckpointSpec(label, str(path.resolve()), _sha256(path),
                                    float(epoch) if isinstance(epoch, (int, float)) else float("nan"),
                                    str(init_path.resolve()) if init_path else "", init_sha))
    assert layout is not None
    names = tuple(n for n, _ in layout)
    selected = tuple(n for n in names if pattern.search(n))
    if not selected:
        raise UsageError(f"--params {params!r} matches no parameter; the model has {list(names)}")
    layer_sizes = tuple(int(np.prod(s)) for _, s in layout)
    n_sel = sum(s for n, s in zip(names, layer_sizes) if n in selected)
    if trials_per_unit is None:
        per_trial = len(sizes) * n_sel * 4 if keep == "vectors" else 1
        trials_per_unit = max(1, min(trials, UNIT_TARGET_TRIALS, GRAD_SUM_CHUNK_BYTES // max(per_trial, 1)))
    if trials_per_unit < 1:
        raise UsageError(f"--trials-per-unit must be >= 1, got {trials_per_unit}")
    return ProbeConfig(
        checkpoints=tuple(specs), data=data, model=model, model_kwargs_json=json.dumps(
            dict(model_kwargs) if model_kwargs is not None else None, sort_keys=True),
        batch_sizes=tuple(sorted(sizes)), budget=int(budget), trials=int(trials), protocol=protocol,
        reduction=reduction, lr=float(lr), params=params, keep=keep, seed=int(seed), device=device, dtype=dtype,
        replacement=bool(replacement), trials_per_unit=int(trials_per_unit), pool_size=pool_size,
        input_shape=tuple(bundle.input_shape), n_classes=int(bundle.n_classes), layers=names,
        layer_sizes=layer_sizes, selected=selected, loss=loss, collate=collate,
        loss_sha256=(source_sha256(loss_fn) or "") if loss not in LOSSES else "")


# ---------------------------------------------------------------------------------------------------------------
# the store layout


def store_variables(config: ProbeConfig) -> list[VarSpec]:
    """The schema's variables for this config (``entry_hist`` only with keep = histograms or vectors), plus the
    frozen protocol's standard errors of the moment estimates."""
    out = [v for v in probe_variables(config.protocol, config.keep == "vectors")
           if config.keep != "norms" or v.name != "entry_hist"]
    if config.keep == "vectors":
        layout, offset = [], 0
        for n, s in zip(config.layers, config.layer_sizes):
            if n in config.selected:
                layout.append([n, offset, s])
                offset += s
        out = [VarSpec(v.name, v.dims, v.dtype, v.long_name, v.units, v.fill,
                       {**v.attrs, "layout": json.dumps(layout),
                        "layout_doc": "[parameter, first element, number of elements] (C order)"})
               if v.name == "grad_sum" else v for v in out]
    return out


def store_sizes(config: ProbeConfig) -> dict[str, int]:
    sizes = {"checkpoint": len(config.checkpoints), "batch_size": len(config.batch_sizes), "trial": config.trials,
             "layer": len(config.layers), "group": len(GROUPS), "example": config.budget,
             "bin": entry_bin_edges()[0].size}
    if config.protocol == "frozen":
        sizes["minibatch"] = config.budget
    if config.keep == "vectors":
        sizes["vector_element"] = config.n_selected
    return sizes


def store_nbytes(config: ProbeConfig) -> int:
    """Uncompressed size of the store's variables (an upper bound on disk: zarr compresses)."""
    sizes = store_sizes(config)
    return int(sum(np.prod([sizes[d] for d in v.dims]) * np.dtype(v.dtype).itemsize
                   for v in store_variables(config)) + np.prod([sizes["checkpoint"], sizes["trial"]]))


def create_probe_store(path: str | os.PathLike, config: ProbeConfig) -> None:
    """Write the template of the probe store (dims, coords, attrs, every variable at its fill value)."""
    from gradlab.probe.distance import param_kind
    from gradlab.store import create_store

    from gradlab.provenance import package_versions
    from gradlab.task import task_record

    lower, upper = entry_bin_edges()
    sizes = store_sizes(config)
    ck = config.checkpoints
    coords: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "checkpoint": ("checkpoint", [c.label for c in ck], {"long_name": "checkpoint", "units": "1"}),
        "checkpoint_path": ("checkpoint", [c.path for c in ck], {"long_name": "checkpoint file", "units": "1"}),
        "checkpoint_sha256": ("checkpoint", [c.sha256 for c in ck], {"long_name": "checkpoint SHA-256", "units": "1"}),
        "checkpoint_epoch": ("checkpoint", np.array([c.epoch for c in ck]),
                             {"long_name": "epoch of checkpoint", "units": "epoch"}),
        "init_path": ("checkpoint", [c.init_path for c in ck],
                      {"long_name": "init checkpoint file ('' if unknown)", "units": "1"}),
        "batch_size": ("batch_size", np.array(config.batch_sizes, dtype=np.int64),
                       {"long_name": "batch size m", "units": "examples"}),
        "trial": ("trial", np.arange(config.trials, dtype=np.int64), {"long_name": "trial", "units": "1"}),
        "layer": ("layer", list(config.layers), {"long_name": "parameter tensor", "units": "1"}),
        "param_kind": ("layer", [param_kind(n) for n in config.layers],
                       {"long_name": "weight or bias", "units": "1"}),
        "layer_size": ("layer", np.array(config.layer_sizes, dtype=np.int64),
                       {"long_name": "number of entries", "units": "1"}),
        "selected": ("layer", np.array([n in config.selected for n in config.layers]),
                     {"long_name": "selected by --params (enters the gradient norms)", "units": "1"}),
        "group": ("group", list(GROUPS), {"long_name": "parameter group", "units": "1"}),
        "example": ("example", np.arange(config.budget, dtype=np.int64),
                    {"long_name": "position in the trial's draw", "units": "1"}),
        "bin": ("bin", np.arange(sizes["bin"], dtype=np.int64), {"long_name": "entry histogram bin", "units": "1"}),
        "bin_lower": ("bin", lower, {"long_name": "lower bin edge", "units": "loss / parameter unit"}),
        "bin_upper": ("bin", upper, {"long_name": "upper bin edge", "units": "loss / parameter unit"}),
    }
    if "minibatch" in sizes:
        coords["minibatch"] = ("minibatch", np.arange(config.budget, dtype=np.int64),
                               {"long_name": "minibatch index k in the partition", "units": "1"})
    if "vector_element" in sizes:
        coords["vector_element"] = ("vector_element", np.arange(sizes["vector_element"], dtype=np.int64),
                                    {"long_name": "element of the selected parameters", "units": "1"})
    attrs = {
        "protocol": config.protocol, "reduction": config.reduction, "budget": config.budget,
        "replacement": config.replacement, "pool_size": config.pool_size, "seed": config.seed, "lr": config.lr,
        "keep": config.keep, "params": config.params, "selected": list(config.selected), "data": config.data,
        "dtype": config.dtype, "device": config.device, "trials_per_unit": config.trials_per_unit,
        "model_mode": config.model_mode, "loss": config.loss,
        "task": task_record(data=config.data, loss=config.loss, model=config.model, collate=config.collate),
        "seed_derivation": SEED_DERIVATION,
        "versions": json.dumps(package_versions()),
    }
    create_store(path, kind="probe", sizes=sizes, coords=coords, variables=store_variables(config),
                 unit_dims=("checkpoint", "trial"), chunks={"checkpoint": 1, "trial": config.trials_per_unit},
                 config=config.to_dict(), attrs=attrs)


# ---------------------------------------------------------------------------------------------------------------
# computing one unit (runs on the driver or on a Dask worker)


@functools.lru_cache(maxsize=2)
def _pool(data: str, device: str, collate: str | None = None) -> Any:
    """The training split as one batch pytree on ``device`` (dtypes as the data gives them)."""
    from gradlab.datasets import load_data
    from gradlab.task import to_run

    return to_run(load_data(data, collate=collate).train.batch, device=device)


@functools.lru_cache(maxsize=4)
def _model(path: str, sha256: str, model: str | None, model_kwargs_json: str, input_shape: tuple[int, ...],
           n_classes: int) -> Any:
    from gradlab.checkpoint import build_model_from, load_checkpoint

    ckpt = load_checkpoint(path)
    if _sha256(Path(path)) != sha256:
        raise UsageError(f"{path} changed since the probe started (SHA-256 differs); restore it or start a new store")
    return build_model_from(ckpt, model=model, model_kwargs=json.loads(model_kwargs_json), input_shape=input_shape,
                            n_classes=n_classes)


def _checkpoint_model(config: ProbeConfig, c: int) -> Any:
    spec = config.checkpoints[c]
    return _model(spec.path, spec.sha256, config.model, config.model_kwargs_json, config.input_shape,
                  config.n_classes)


def _gram_engine(config: ProbeConfig, c: int) -> Any:
    """This thread's Gram engine for checkpoint ``c`` (engines hook a private model: one per thread)."""
    return _thread_gram_engine(config, c, threading.get_ident())


@functools.lru_cache(maxsize=8)
def _thread_gram_engine(config: ProbeConfig, c: int, thread: int) -> Any:
    import torch

    from gradlab.probe.gram import GramEngine
    from gradlab.task import resolve_loss

    return GramEngine(_checkpoint_model(config, c), config.selected, dtype=getattr(torch, config.dtype),
                      device=config.device, loss=resolve_loss(config.loss))


def _norms_of(config: ProbeConfig, sums: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """‖S‖, per-layer (NaN if unselected) and per-group norms of one trial's S (float64 accumulation)."""
    from gradlab.probe.distance import param_kind

    layer_sq = np.full(len(config.layers), np.nan)
    for i, n in enumerate(config.layers):
        if n in sums:
            v = np.asarray(sums[n], dtype=np.float64).ravel()
            layer_sq[i] = float(v @ v)
    group = np.full(len(GROUPS), np.nan)
    sel = np.array([n in sums for n in config.layers])  # not isnan(layer_sq): a non-finite S must stay NaN
    kinds = np.array([param_kind(n) for n in config.layers])
    for j, g in enumerate(GROUPS):
        mask = sel & ((kinds == g) | (g == "all"))
        if mask.any():
            group[j] = np.sqrt(layer_sq[mask].sum())
    return float(np.sqrt(layer_sq[sel].sum())), np.sqrt(layer_sq), group


def _entry_outputs(config: ProbeConfig, vec: np.ndarray, out: dict[str, np.ndarray], i: int, j: int) -> int:
    """Histogram / vector of one S (flattened selected entries) into ``out``; returns its non-finite count."""
    if config.keep == "norms":
        return int((~np.isfinite(vec)).sum())
    from gradlab.probe.histogram import entry_histogram_torch

    counts, nonfinite = entry_histogram_torch(vec)  # the schema's bins and counts, vectorised in torch
    out["entry_hist"][i, j] = counts
    if config.keep == "vectors":
        out["grad_sum"][i, j] = vec
    return nonfinite


def _empty_outputs(config: ProbeConfig, tb: int) -> dict[str, np.ndarray]:
    sizes = {**store_sizes(config), "trial": tb}
    out = {}
    for v in store_variables(config):
        if "trial" in v.dims:
            out[v.name] = np.full([sizes[d] for d in v.dims if d != "checkpoint"], v.fill_value(), dtype=v.dtype)
    return out


def compute_unit(config: ProbeConfig, c: int, t0: int, t1: int) -> dict[str, np.ndarray]:
    """All per-trial variables of trials ``[t0, t1)`` of checkpoint ``c``, shaped as their store regions (the
    ``checkpoint`` dim dropped).  Depends only on its arguments (and the files the config names)."""
    import torch

    from gradlab.probe.sampling import draw_trials

    from gradlab.task import index_batch, resolve_loss, tensor_leaves

    pool = _pool(config.data, config.device, config.collate)
    pool_device = tensor_leaves(pool)[0].device
    idx = draw_trials(config.seed, c, range(t0, t1), config.budget, config.pool_size, config.replacement)
    out = _empty_outputs(config, t1 - t0)
    out["example_index"][...] = idx
    order = [n for n in config.layers if n in config.selected]
    if config.protocol == "frozen":
        from gradlab.probe.distance import param_kind
        from gradlab.probe.frozen import frozen_trial, reduction_scale
        from gradlab.probe.histogram import ScaledHistograms

        engine = _gram_engine(config, c)
        kinds = {n: param_kind(n) for n in order}
        sel_idx = [config.layers.index(n) for n in order]
        for j in range(t1 - t0):
            rows = torch.as_tensor(idx[j], device=pool_device)
            res = engine(index_batch(pool, rows))
            ft = frozen_trial(res.gram, kinds, config.batch_sizes, config.reduction)
            out["grad_norm"][:, j] = ft.grad_norm
            out["grad_norm_layer"][:, j, sel_idx] = ft.grad_norm_layer
            out["grad_norm_group"][:, j] = ft.grad_norm_group
            out["minibatch_grad_norm"][:, j] = ft.minibatch_grad_norm
            out["gram_trace"][j] = ft.gram_trace
            out["gram_sum"][j] = ft.gram_sum
            base = torch.cat([res.grad_sum[n].reshape(-1) for n in order])
            # S_m = c_m·base: one log pass serves every batch size's histogram; finiteness does not depend on m
            hist = ScaledHistograms(base) if config.keep != "norms" else None
            bad = hist.nonfinite if hist is not None else int((~torch.isfinite(base)).sum())
            for i, m in enumerate(config.batch_sizes):
                scale = reduction_scale(int(m), config.reduction)
                out["nonfinite_count"][i, j] = bad
                if hist is not None:
                    out["entry_hist"][i, j] = hist.counts(scale)
                if config.keep == "vectors":
                    out["grad_sum"][i, j] = (base * scale).cpu().numpy()
    else:
        from gradlab.probe.step import step_trials

        net = _checkpoint_model(config, c)
        for i, m in enumerate(config.batch_sizes):
            r = step_trials(net, pool, None, torch.as_tensor(idx), int(m), config.lr,
                            config.reduction, order,  # type: ignore[arg-type]
                            dtype=getattr(torch, config.dtype), device=config.device,
                            loss=resolve_loss(config.loss))
            for j in range(t1 - t0):
                sums = {n: r.grad_sum[n][j] for n in order}
                out["grad_norm"][i, j], out["grad_norm_layer"][i, j], out["grad_norm_group"][i, j] = \
                    _norms_of(config, sums)
                vec = np.concatenate([sums[n].reshape(-1) for n in order])
                _entry_outputs(config, vec, out, i, j)
            out["displacement"][i] = r.displacement
            out["step_grad_norm_mean"][i] = r.step_norm_mean
            out["step_grad_norm_std"][i] = r.step_norm_std
            out["step_grad_norm_max"][i] = r.step_norm_max
            out["nonfinite_count"][i] = r.nonfinite
    return out


# ---------------------------------------------------------------------------------------------------------------
# per-checkpoint variables


def finalize(writer: Any, config: ProbeConfig) -> None:
    """Write the per-checkpoint variables from the stored trials (moment estimates) and the checkpoint files
    (distances).  Idempotent: a resume rewrites the same values."""
    import torch

    from gradlab.checkpoint import build_model_from, load_checkpoint
    from gradlab.probe.distance import distances

    def state(path: str) -> dict[str, Any]:
        net = build_model_from(load_checkpoint(path), model=config.model, model_kwargs=config.model_kwargs,
                               input_shape=config.input_shape, n_classes=config.n_classes)
        return {n: p.detach() for n, p in net.named_parameters()}

    for c, spec in enumerate(config.checkpoints):
        with torch.no_grad():
            d = distances(state(spec.path), state(spec.init_path) if spec.init_path else None, config.layers)
        for name in ("dist_init_layer", "dist_origin_layer", "cos_init_layer", "dist_init", "dist_origin",
                     "cos_init"):
            writer.write(name, {"checkpoint": c}, getattr(d, name))
        if config.protocol == "frozen":
            from gradlab.probe.frozen import checkpoint_estimates

            est = checkpoint_estimates(writer.read("gram_trace", {"checkpoint": c}),
                                       writer.read("gram_sum", {"checkpoint": c}), config.budget, config.pool_size,
                                       config.replacement)
            for name in ("grad_sq_norm", "grad_sq_norm_se", "trace_cov", "trace_cov_se", "b_noise"):
                writer.write(name, {"checkpoint": c}, getattr(est, name))


# ---------------------------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class ProbePlan:
    """What a run would do: units to compute, an estimated time from a calibration trial, and the store size."""

    units_total: int
    units_todo: int
    seconds_per_trial: float
    estimated_seconds: float
    store_bytes: int
    trials_per_unit: int


def plan_probe(config: ProbeConfig, out: str | os.PathLike, *, resume: bool = False, workers: int = 1) -> ProbePlan:
    """The plan of a run (``--dry-run``): times a calibration unit of the first checkpoint (after a warm-up run of
    one trial) and scales by the trials still to do; writes nothing.

    The step protocol's calibration unit is one engine block of trials (2 on CPU, as the run itself advances
    them): on a digits MLP, timing a lone trial overestimated the run 1.7× on CPU and a block of two about 1.3×
    (the run's units of 8 trials amortise more): the estimate tends to be high.
    """
    units = config.units()
    todo = units
    path = Path(out)
    if resume and (path / "zarr.json").exists():
        import zarr

        done = np.asarray(zarr.open_group(path, mode="r")["done"][...])
        todo = [u for u in units if not bool(done[u[0], u[1]])]
    elif path.exists():
        raise UsageError(f"{path} already exists; pass --resume to continue it, or choose another --out")
    n_cal = 1
    if config.protocol == "step":
        from gradlab.probe.step import DEFAULT_TRIALS_PER_BLOCK

        block = DEFAULT_TRIALS_PER_BLOCK.get(torch_device_type(config.device), 2)
        n_cal = max(1, min(config.trials, config.trials_per_unit, block))
    compute_unit(config, 0, 0, 1)  # warm-up: loads data and model
    start = time.perf_counter()
    compute_unit(config, 0, 0, n_cal)
    per_trial = (time.perf_counter() - start) / n_cal
    remaining = sum(t1 - t0 for _, t0, t1 in todo)
    return ProbePlan(len(units), len(todo), per_trial, per_trial * remaining / max(workers, 1),
                     store_nbytes(config), config.trials_per_unit)


def torch_device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"`` (the device string's type, without importing torch)."""
    return str(device).split(":", 1)[0]


def _kill_hook(stage: str, count: int) -> None:
    spec = os.environ.get("GRADLAB_PROBE_KILL_AFTER")
    if spec and spec == f"{stage}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def _warn_nonfinite(config: ProbeConfig, c: int, t0: int, result: Mapping[str, np.ndarray]) -> int:
    bad = result["nonfinite_count"]
    total = int(bad.sum())
    if total:
        trials = sorted({t0 + int(t) for t in np.nonzero(bad)[1]})
        log.warning("checkpoint %s: %d non-finite gradient entries in trials %s (recorded in nonfinite_count; "
                    "their norms are NaN or inf)", config.checkpoints[c].label, total, trials)
    return total


def _local_results(config: ProbeConfig, todo: Sequence[tuple[int, int, int]]
                   ) -> Iterator[tuple[tuple[int, int, int], dict[str, np.ndarray]]]:
    for unit in todo:
        yield unit, compute_unit(config, *unit)


def _dask_client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    """A Dask client on the cluster at ``scheduler``, or on a new local cluster of ``workers`` processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler!r} ({exc}); check --scheduler") from None
    cluster = LocalCluster(n_workers=int(workers or 1), threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _dask_results(client: Any, config: ProbeConfig, todo: Sequence[tuple[int, int, int]]
                  ) -> Iterator[tuple[tuple[int, int, int], dict[str, np.ndarray]]]:
    """Submit units (``pure=False``) with at most two per worker in flight; yield results as they complete."""
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    pending = list(todo)
    ac = as_completed()
    units: dict[Any, tuple[int, int, int]] = {}

    def submit() -> None:
        unit = pending.pop(0)
        fut = client.submit(compute_unit, config, *unit, pure=False)
        units[fut.key] = unit
        ac.add(fut)

    for _ in range(min(2 * n_workers, len(pending))):
        submit()
    for fut in ac:
        result = fut.result()
        unit = units.pop(fut.key)
        fut.release()
        if pending:
            submit()
        yield unit, result


@dataclass(frozen=True)
class ProbeSummary:
    """What a run did."""

    path: str
    units_computed: int
    units_total: int
    nonfinite: int
    seconds: float


def run_probe(config: ProbeConfig, out: str | os.PathLike, *, resume: bool = False, workers: int | None = None,
              scheduler: str | None = None, progress: bool = False) -> ProbeSummary:
    """Create (or resume) the store at ``out`` and compute every undone unit, then the per-checkpoint variables.

    ``workers``/``scheduler``: run units on a local Dask cluster of that many worker processes, or on the cluster
    at that address; the driver writes.  ``progress``: a tqdm bar with ETA on stderr.
    """
    from gradlab.store import writer_for

    start = time.perf_counter()
    cfg = config.to_dict()
    client, cluster = _dask_client(workers, scheduler) if (workers or scheduler) else (None, None)
    try:
        with writer_for(out, resume=resume, config=cfg, create=lambda: create_probe_store(out, config)) as writer:
            nonfinite, todo = _run_units(writer, config, client, progress)
            finalize(writer, config)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    if nonfinite:
        log.warning("%d non-finite gradient entries in total; see nonfinite_count in %s", nonfinite, out)
    return ProbeSummary(str(out), len(todo), len(config.units()), nonfinite, time.perf_counter() - start)


def _run_units(writer: Any, config: ProbeConfig, client: Any, progress: bool) -> tuple[int, list]:
    """Compute every undone unit, writing each one's regions and then marking it done."""
    from tqdm import tqdm

    done = writer.done()
    todo = [u for u in config.units() if not bool(done[u[0], u[1]])]
    log.info("probe %s: %d of %d units to compute", writer.path, len(todo), len(config.units()))
    results = _dask_results(client, config, todo) if client is not None else _local_results(config, todo)
    nonfinite = 0
    n_done = 0
    with tqdm(total=len(todo), unit="unit", file=sys.stderr, disable=not progress, desc="probe") as bar:
        for (c, t0, t1), result in results:
            region = {"checkpoint": c, "trial": slice(t0, t1)}
            for name, values in result.items():
                writer.write(name, region, values)
            n_done += 1
            _kill_hook("write", n_done)
            writer.mark_done(region)
            _kill_hook("done", n_done)
            nonfinite += _warn_nonfinite(config, c, t0, result)
            bar.update(1)
    return nonfinite, todo
