"""Training runs and grids (batch sizes × learning rates × seeds) with init/early/late checkpoints.

Each run trains a fresh model for ``epochs`` epochs with SGD (optional momentum) or Adam, under a learning-rate
rule (:mod:`gradlab.lr_rules`), and saves checkpoints at epoch 0 (init) and at ``checkpoint_epochs`` (default the
blog's early = 2 and late = 30).  Per epoch it records train/test loss and accuracy and the distance from init per
parameter tensor and per group (all / weights / biases) in one zarr store ``<out>/train.zarr`` with dims
(run, epoch, layer, group).  A run whose loss turns non-finite is recorded as diverged and the grid goes on.

Determinism: run r with seed s initialises its model from ``SeedSequence([s, 0])`` -- every run of a seed starts
from the same θ₀ whatever its batch size or lr -- and shuffles with ``SeedSequence([s, 1, m])``.  The global RNG
is forked, never changed, so results on CPU depend only on the config.  The last, smaller minibatch of an epoch
is kept (every example is seen once per epoch), except a last batch that a model's train-mode batch norm cannot
normalise (a single example): it is left out, like ``drop_last``, and the grid says so once.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlab._callable import make_callable
from gradlab.checkpoint import Recipe
from gradlab.datasets import DataBundle, load_data, sparse_labels
from gradlab.errors import UsageError
from gradlab.factory import is_factory_spec
from gradlab.lr_rules import LRRule
from gradlab.models import build_model
from gradlab.task import check_task, loss_name, resolve_loss, single_example_batch_norm

log = logging.getLogger(__name__)
make_callable(__name__, "train")  # gradlab.train(...) is the Python API (gradlab.api.train)
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """A grid of runs: every combination of ``batch_sizes`` × ``lrs`` × ``seeds`` × ``optimizers``."""

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_root: str | None = None
    download: bool = False
    batch_sizes: tuple[int, ...] = (32, 256)
    lrs: tuple[float, ...] = (0.01,)
    seeds: tuple[int, ...] = (0,)
    optimizers: tuple[str, ...] = ("sgd",)
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 30
    checkpoint_epochs: tuple[int, ...] | None = None  # None: (2, epochs), the blog's early and late
    lr_scaling: str = "constant"
    base_batch_size: int = 32
    warmup_epochs: float = 0.0
    decay_epochs: tuple[int, ...] = ()
    decay_factor: float = 0.1
    cyclic: bool = False
    cyclic_factor: float = 10.0
    cyclic_sqrt_factor: bool = False
    cyclic_half_epochs: float = 2.0
    ghost_batch_size: int | None = None
    checkpoint_format: str = "pt"
    loss: str | None = None  # per-example loss (gradlab.task): cross-entropy, mse, lm, pkg.module:fn; None: the data's
    dtype: str | None = None  # float32 / float64: model and floating data in this dtype (None: as they come)
    monitor_every: int = 1  # record the gradient noise monitor every K steps into runs/<run>/monitor.zarr (0: off)
    collate: str | None = None  # pkg.module:fn turning a Dataset's items into one batch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


@dataclass(frozen=True)
class RunSpec:
    index: int
    batch_size: int
    lr: float
    seed: int
    optimizer: str

    @property
    def name(self) -> str:
        return f"bs{self.batch_size}_lr{self.lr:g}_seed{self.seed}_{self.optimizer}"


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table/object"}.get(
        t, getattr(t, "__name__", str(t)))


def check_types(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Check every value of a config dict against ``TrainConfig``'s field types; returns the dict with grid axes
    as tuples (a lone scalar becomes a 1-tuple).  Raises a one-line :class:`UsageError` naming key and type."""
    import types
    import typing

    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, Any] = {}

    def ok(value: Any, t: Any) -> bool:
        if t is bool:
            return isinstance(value, bool)
        if t is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if t is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, t)

    for key, value in raw.items():
        t = hints[key]
        optional = False
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            args = [a for a in typing.get_args(t) if a is not type(None)]
            optional, t = True, args[0]
        if value is None and optional:
            out[key] = None
            continue
        origin = typing.get_origin(t)
        if origin is tuple:
            elem = typing.get_args(t)[0]
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in items if not ok(v, elem)]
            if bad:
                raise UsageError(f"{where}: {key} must be a list whose items are each {_type_name(elem)}, got "
                                 f"{value!r}")
            out[key] = tuple(float(v) if elem is float else v for v in items)
            continue
        base = origin or t
        if not ok(value, base):
            raise UsageError(f"{where}: {key} must be {_type_name(base)}, got {value!r} ({type(value).__name__})")
        if base is float:
            value = float(value)
        if base is dict and not all(isinstance(k, str) for k in value):
            raise UsageError(f"{where}: {key} must have string keys, got {value!r}")
        out[key] = value
    return out


def expand_grid(cfg: TrainConfig) -> list[RunSpec]:
    combos = itertools.product(cfg.batch_sizes, cfg.lrs, cfg.seeds, cfg.optimizers)
    return [RunSpec(i, int(m), float(lr), int(s), str(o)) for i, (m, lr, s, o) in enumerate(combos)]


def validate(cfg: TrainConfig, data: DataBundle) -> nn.Module:
    """Refuse an empty or invalid grid (and an unknown model) before anything is written; returns the model of
    seed 0, built once here so callers can read its layout."""
    problem = None if is_factory_spec(cfg.model) else sparse_labels(data)
    if problem:
        raise UsageError(problem)
    model = init_model(cfg, data, 0)
    loss_fn = resolve_loss(cfg.loss or data.loss)
    check_task(model, loss_fn, data.train, name=loss_name(cfg.loss or data.loss))
    n = len(data.train)
    if not cfg.batch_sizes or not cfg.lrs or not cfg.seeds or not cfg.optimizers:
        raise UsageError("the grid is empty: give at least one batch size, learning rate, seed and optimizer")
    for m in cfg.batch_sizes:
        if m < 1:
            raise UsageError(f"batch size {m} is invalid; batch sizes must be >= 1")
        if m > n:
            raise UsageError(f"batch size {m} is larger than the {n} training examples of {data.name!r}; "
                             f"use batch sizes <= {n}")
    for lr in cfg.lrs:
        if not (lr > 0 and math.isfinite(lr)):
            raise UsageError(f"learning rate {lr} is invalid; learning rates must be > 0")
    for o in cfg.optimizers:
        if o not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {o!r}; choose one of {list(OPTIMIZERS)}")
    if cfg.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.epochs > 100_000:
        raise UsageError(f"--epochs {cfg.epochs} is too large (at most 100000)")
    for name in ("momentum", "weight_decay"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not cfg.momentum < 1:
        raise UsageError(f"--momentum must be below 1, got {cfg.momentum}")
    for name in ("warmup_epochs", "decay_factor", "cyclic_factor", "cyclic_half_epochs"):
        if not math.isfinite(getattr(cfg, name)):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(cfg, name)}")
    for name in ("seeds", "decay_epochs"):
        if any(v < 0 for v in getattr(cfg, name)):
            raise UsageError(f"--{name.replace('_', '-')} must be non-negative integers, got {list(getattr(cfg, name))}")
    if any(s >= 2**63 for s in cfg.seeds):
        raise UsageError(f"--seeds must be below 2**63, got {list(cfg.seeds)}")
    bad = [e for e in checkpoint_epochs(cfg) if not 0 <= e <= cfg.epochs]
    if bad:
        raise UsageError(f"checkpoint epochs {bad} are outside 0..{cfg.epochs}; pick epochs within the run")
    if isinstance(cfg.monitor_every, bool) or not isinstance(cfg.monitor_every, int) or cfg.monitor_every < 0:
        raise UsageError(f"--monitor-every must be an integer ≥ 0 (record every K-th step; 0: no monitor), got "
                         f"{cfg.monitor_every!r}")
    if cfg.ghost_batch_size is not None and cfg.ghost_batch_size < 1:
        raise UsageError(f"--ghost-batch-size must be >= 1, got {cfg.ghost_batch_size}")
    if cfg.checkpoint_format not in ("pt", "safetensors"):
        raise UsageError("--checkpoint-format must be 'pt' or 'safetensors'")
    for spec in expand_grid(cfg):
        rule_for(cfg, spec)  # raises UsageError on a bad rule
    single = single_example_batch_norm(model, loss_fn, data.train, cfg.batch_sizes)
    if single:
        from gradlab.store import option

        raise UsageError(f"batch norm in train mode needs at least 2 examples per batch: batch size {single[0]} in "
                         f"{option('batch_sizes')} gives it one value per channel; drop it (or build the model "
                         "without batch norm)")
    return model


def warn_dropped_last_batches(cfg: TrainConfig, data: DataBundle, model: nn.Module) -> None:
    """Say once that a grid leaves out epochs' last single-example batches (:func:`dropped_last_batches`)."""
    dropped = dropped_last_batches(cfg, data, model)
    if dropped:
        log.warning("the model's train-mode batch norm cannot normalise a batch of one example: an epoch of %d "
                    "examples at batch size %s would end on one, so that last example of each epoch's shuffle is "
                    "left out (like drop_last) for %s", len(data.train), ", ".join(map(str, dropped)),
                    "that batch size" if len(dropped) == 1 else "those batch sizes")


def dropped_last_batches(cfg: TrainConfig, data: DataBundle, model: nn.Module) -> tuple[int, ...]:
    """The batch sizes whose epochs end on a final batch that the model's train-mode batch norm cannot take (one
    example: one value per channel; a ghost batch norm's last virtual batch of one): that batch is left out."""
    n = len(data.train)
    rests = {m: n % m for m in cfg.batch_sizes if n % m}
    if not rests:
        return ()
    failing = set(single_example_batch_norm(model, resolve_loss(cfg.loss or data.loss), data.train,
                                            sorted(set(rests.values()))))
    return tuple(sorted(m for m, r in rests.items() if r in failing))


def checkpoint_epochs(cfg: TrainConfig) -> tuple[int, ...]:
    """The epochs checkpointed besides init: as given, else early = min(2, epochs) and late = epochs."""
    if cfg.checkpoint_epochs is not None:
        return tuple(cfg.checkpoint_epochs)
    return tuple(sorted({min(2, cfg.epochs), cfg.epochs}))


def rule_for(cfg: TrainConfig, spec: RunSpec) -> LRRule:
    return LRRule(lr=spec.lr, batch_size=spec.batch_size, scaling=cfg.lr_scaling, base_batch_size=cfg.base_batch_size,
                  warmup_epochs=cfg.warmup_epochs, decay_epochs=tuple(cfg.decay_epochs),
                  decay_factor=cfg.decay_factor, cyclic=cfg.cyclic, cyclic_factor=cfg.cyclic_factor,
                  cyclic_sqrt_factor=cfg.cyclic_sqrt_factor, cyclic_half_epochs=cfg.cyclic_half_epochs)


def _torch_seed(*coords: int) -> int:
    return int(np.random.SeedSequence([int(c) for c in coords]).generate_state(1, dtype=np.uint64)[0] >> 1)


def init_model(cfg: TrainConfig, data: DataBundle, seed: int) -> nn.Module:
    """Build the model with weights drawn from ``SeedSequence([seed, 0])``, leaving the global RNG untouched."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.ghost_batch_size is not None:
        kwargs.setdefault("ghost_batch_size", cfg.ghost_batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_torch_seed(seed, 0))
        model = build_model(cfg.model, data.input_shape, data.n_classes, **kwargs)
    return model.to(dtype=getattr(torch, cfg.dtype)) if cfg.dtype else model


def recipe_for(cfg: TrainConfig, data: DataBundle) -> Recipe:
    kwargs = dict(cfg.model_kwargs)
    if cfg.ghost_batch_size is not None:
        kwargs.setdefault("ghost_batch_size", cfg.ghost_batch_size)
    return Recipe(cfg.model, kwargs, data.input_shape, data.n_classes)

def load_train_data(cfg: TrainConfig) -> DataBundle:
    """The grid's data, in ``cfg.dtype`` when one is asked for (only then)."""
    data = load_data(cfg.data, root=cfg.data_root, download=cfg.download, collate=cfg.collate)
    if cfg.dtype is not None:
        if cfg.dtype not in ("float32", "float64"):
            raise UsageError(f"--dtype must be float32 or float64, got {cfg.dtype!r}")
        from gradlab.train_loop import with_dtype

        data = with_dtype(data, getattr(torch, cfg.dtype))
    return data


def _own_entry(p: Path) -> bool:
    """gradlab's own leftovers in a train --out folder before its store exists: the lock file and the staging
    folders of a killed store creation, and an empty ``runs`` folder."""
    return (p.name == ".train.zarr.lock" or p.name.startswith(".train.zarr.tmp-")
            or (p.name == "runs" and p.is_dir() and not any(p.iterdir())))


def train_grid(cfg: TrainConfig, out: str | Path, *, resume: bool = False, show_progress: bool = True,
               workers: int | None = None, scheduler: str | None = None) -> Path:
    """Train every run of the grid into ``out`` (``train.zarr`` + ``runs/<name>/epochNNN.pt``); resumable
    (:class:`gradlab.train_job.TrainJob` on the one runner; ``workers``/``scheduler``: runs as Dask tasks, whose
    workers must see ``out``)."""
    from gradlab.runner import run_job
    from gradlab.train_job import TrainJob

    out = Path(out)
    check_types(dict(cfg.__dict__), "config")
    data = load_train_data(cfg)
    warn_dropped_last_batches(cfg, data, validate(cfg, data))
    store = out / "train.zarr"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new or empty) for the runs")
    if out.exists() and not store.exists() and any(not _own_entry(p) for p in out.iterdir()):
        raise UsageError(f"{out} holds other data (no train.zarr); choose an empty or new folder for --out")
    run_job(TrainJob(cfg, str(out.resolve())), store, resume=resume, progress=show_progress, state=data,
            workers=workers, scheduler=scheduler)
    return store


def parse_list(text: str, cast: Any, flag: str) -> tuple[Any, ...]:
    """Parse ``1,2,3`` for a flag, with a usage error naming the flag."""
    try:
        items = tuple(cast(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{flag} expects a comma-separated list, got {text!r}") from None
    return items


def config_from_toml(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A grid from a TOML file whose keys are TrainConfig fields (lists for the grid axes)."""
    import tomllib

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"config file {p} is a folder; give the path of a TOML file")
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist")
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p} is not valid TOML: {exc}") from None
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"{p}: unknown keys {unknown}; valid keys are {sorted(known)}")
    raw.update(overrides or {})
    return TrainConfig(**check_types(raw, str(p)))
