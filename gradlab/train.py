"""Training runs and grids (batch sizes × learning rates × seeds) with init/early/late checkpoints.

Each run trains a fresh model for ``epochs`` epochs with SGD (optional momentum) or Adam, under a learning-rate
rule (:mod:`gradlab.lr_rules`), and saves checkpoints at epoch 0 (init) and at ``checkpoint_epochs`` (default the
blog's early = 2 and late = 30).  Per epoch it records train/test loss and accuracy and the distance from init per
parameter tensor and per group (all / weights / biases) in one zarr store ``<out>/train.zarr`` with dims
(run, epoch, layer, group).  A run whose loss turns non-finite is recorded as diverged and the grid goes on.

Determinism: run r with seed s initialises its model from ``SeedSequence([s, 0])`` -- every run of a seed starts
from the same θ₀ whatever its batch size or lr -- and shuffles with ``SeedSequence([s, 1, m])``.  The global RNG
is forked, never changed, so results on CPU depend only on the config.  The last, smaller minibatch of an epoch
is kept (every example is seen once per epoch).
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradlab._callable import make_callable
from gradlab.checkpoint import Recipe, save_checkpoint
from gradlab.datasets import DataBundle, Split, load_data, sparse_labels
from gradlab.errors import UsageError
from gradlab.factory import is_factory_spec
from gradlab.lr_rules import LRRule
from gradlab.models import build_model
from gradlab.schema import GROUPS
from gradlab.store import VarSpec, create_store, writer_for
from gradlab.task import (PerExampleLoss, check_task, cross_entropy, inputs_targets, loss_name, resolve_loss,
                          task_record, to_run)

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
    check_task(model, resolve_loss(cfg.loss or data.loss), data.train, name=loss_name(cfg.loss or data.loss))
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
    if cfg.ghost_batch_size is not None and cfg.ghost_batch_size < 1:
        raise UsageError(f"--ghost-batch-size must be >= 1, got {cfg.ghost_batch_size}")
    if cfg.checkpoint_format not in ("pt", "safetensors"):
        raise UsageError("--checkpoint-format must be 'pt' or 'safetensors'")
    for spec in expand_grid(cfg):
        rule_for(cfg, spec)  # raises UsageError on a bad rule
    return model


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


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, chunk: int = 2048,
             loss: PerExampleLoss = cross_entropy) -> tuple[float, float]:
    """Mean per-example loss and accuracy (classification with logits (B, C) only, else NaN) of ``model`` (in eval
    mode) on ``split``; restores the training flag."""
    was_training = model.training
    model.eval()
    total, correct, classify = 0.0, 0, loss is cross_entropy
    for start in range(0, len(split), chunk):
        batch = split[start:start + chunk]
        if classify:
            xb, yb = inputs_targets(batch)
            out = model(xb)
            if isinstance(out, torch.Tensor) and out.dim() == 2 and yb.dim() == 1:
                total += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(1) == yb).sum())
                continue
            classify = False
        total += float(loss(model, batch).sum())
    model.train(was_training)
    return total / len(split), (correct / len(split) if classify else math.nan)


def with_dtype(data: DataBundle, dtype: torch.dtype) -> DataBundle:
    """The bundle with its floating tensors in ``dtype`` (integer tensors untouched): only on the user's request."""
    import dataclasses

    move = lambda split: Split(to_run(split.batch, dtype=dtype)) if split is not None else None  # noqa: E731
    return dataclasses.replace(data, train=move(data.train), test=move(data.test))


def layer_kinds(model: nn.Module) -> tuple[list[str], list[str]]:
    names = [n for n, _ in model.named_parameters()]
    kinds = ["bias" if n.endswith("bias") else "weight" for n in names]
    return names, kinds


def distances(model: nn.Module, init: dict[str, torch.Tensor]) -> tuple[np.ndarray, ...]:
    """Per tensor ‖θ − θ₀‖ and cos(θ, θ₀); per group (all/weight/bias) ‖θ − θ₀‖ and ‖θ‖."""
    per_d, per_cos, sq_d, sq_o = [], [], dict.fromkeys(GROUPS, 0.0), dict.fromkeys(GROUPS, 0.0)
    for name, p in model.named_parameters():
        theta, theta0 = p.detach().double().flatten(), init[name].double().flatten()
        d2 = float(((theta - theta0) ** 2).sum())
        o2 = float((theta**2).sum())
        denom = math.sqrt(o2 * float((theta0**2).sum()))
        per_d.append(math.sqrt(d2))
        per_cos.append(float(theta @ theta0) / denom if denom > 0 else math.nan)
        kind = "bias" if name.endswith("bias") else "weight"
        for g in ("all", kind):
            sq_d[g] += d2
            sq_o[g] += o2
    return (np.array(per_d), np.array(per_cos), np.sqrt([sq_d[g] for g in GROUPS]),
            np.sqrt([sq_o[g] for g in GROUPS]))


def train_run(cfg: TrainConfig, data: DataBundle, spec: RunSpec, run_dir: Path,
              progress: Any = None) -> dict[str, np.ndarray]:
    """Train one run; returns per-epoch arrays.  Checkpoints go to ``run_dir/epoch{e:03d}.{pt|safetensors}``."""
    from gradlab.probe.step import minibatch_loss

    loss_fn = resolve_loss(cfg.loss or data.loss)
    model = init_model(cfg, data, spec.seed)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = rule_for(cfg, spec)
    if spec.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=rule.lr_at(0, 1), momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=rule.lr_at(0, 1), weight_decay=cfg.weight_decay)
    recipe = recipe_for(cfg, data)
    mon = None
    if cfg.monitor_every:
        from gradlab.monitor import attach_for_train

        mon = attach_for_train(model, opt, loss_fn, run_dir / "monitor.zarr", every=cfg.monitor_every,
                               pool_size=len(data.train), reduction=rule.reduction, resume=True, start_step=0,
                               config={"run": spec.name, "seed": spec.seed, "batch_size": spec.batch_size,
                                       "lr": spec.lr, "optimizer": spec.optimizer})
    gen = torch.Generator().manual_seed(_torch_seed(spec.seed, 1, spec.batch_size))
    n, m, epochs = len(data.train), spec.batch_size, cfg.epochs
    steps_per_epoch = math.ceil(n / m)
    n_layers = len(init)
    out = {k: np.full(epochs + 1, np.nan) for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr_used")}
    out["dist_init_layer"] = np.full((epochs + 1, n_layers), np.nan)
    out["cos_init_layer"] = np.full((epochs + 1, n_layers), np.nan)
    out["dist_init"] = np.full((epochs + 1, len(GROUPS)), np.nan)
    out["dist_origin"] = np.full((epochs + 1, len(GROUPS)), np.nan)
    out["diverged_epoch"] = np.array(-1)
    suffix = "safetensors" if cfg.checkpoint_format == "safetensors" else "pt"

    def record(epoch: int) -> bool:
        tl, ta = evaluate(model, data.train, loss=loss_fn)
        out["train_loss"][epoch], out["train_acc"][epoch] = tl, ta
        if data.test is not None:
            out["test_loss"][epoch], out["test_acc"][epoch] = evaluate(model, data.test, loss=loss_fn)
        (out["dist_init_layer"][epoch], out["cos_init_layer"][epoch], out["dist_init"][epoch],
         out["dist_origin"][epoch]) = distances(model, init)
        if epoch == 0 or epoch in checkpoint_epochs(cfg):
            meta = {"dataset": data.name, "epoch": epoch, "step": epoch * steps_per_epoch, "batch_size": m,
                    "lr": spec.lr, "lr_rule": rule.describe(), "optimizer": spec.optimizer,
                    # the rate of the last step taken (of step 0 at init), as the optimiser applied it
                    "lr_applied": rule.lr_at(max(epoch * steps_per_epoch - 1, 0), steps_per_epoch),
                    "reduction": rule.reduction,
                    "momentum": cfg.momentum, "seed": spec.seed, "tag": "init" if epoch == 0 else f"epoch{epoch}",
                    "run": spec.name}
            if mon is not None:
                mon.flush()
            save_checkpoint(run_dir / f"epoch{epoch:03d}.{suffix}", model, recipe, meta)
        return math.isfinite(tl)

    try:
        record(0)
        step = 0
        model.train()
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(n, generator=gen)
            finite = True
            for start in range(0, n, m):
                idx = perm[start:start + m]
                lr = rule.lr_at(step, steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                batch = data.train[idx]
                loss = mon.loss(batch) if mon is not None else minibatch_loss(model, batch, loss_fn, rule.reduction)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                opt.step()
                step += 1
            out["lr_used"][epoch] = rule.lr_at(max(step - 1, 0), steps_per_epoch)
            if not finite or not record(epoch):
                out["diverged_epoch"] = np.array(epoch)
                log.warning("run %s diverged at epoch %d (non-finite loss); recorded and skipped", spec.name, epoch)
                break
            if progress is not None:
                progress.update(1)
                progress.set_postfix(run=spec.name, test_acc=f"{out['test_acc'][epoch]:.3f}")
    finally:
        if mon is not None:
            mon.close()
    return out


def _store_variables(loss: str = "cross-entropy") -> list[VarSpec]:
    re_ = ("run", "epoch")
    units = "nats" if loss in ("cross-entropy", "lm") else "loss"
    what = {"lm": "token cross-entropy"}.get(loss, loss)
    return [
        VarSpec("train_loss", re_, "float64", f"training loss (mean {what})", units),
        VarSpec("train_acc", re_, "float64", "training accuracy (NaN unless classification)", "1"),
        VarSpec("test_loss", re_, "float64", f"test loss (mean {what})", units),
        VarSpec("test_acc", re_, "float64", "test accuracy (NaN unless classification)", "1"),
        VarSpec("lr_used", re_, "float64", "learning rate applied at the epoch's last step (η̃ under sum reduction)",
                "1"),
        VarSpec("dist_init_layer", (*re_, "layer"), "float64", "distance from init ‖θ − θ₀‖", "parameter unit"),
        VarSpec("cos_init_layer", (*re_, "layer"), "float64", "cosine to init cos(θ, θ₀)", "1"),
        VarSpec("dist_init", (*re_, "group"), "float64", "distance from init ‖θ − θ₀‖", "parameter unit"),
        VarSpec("dist_origin", (*re_, "group"), "float64", "distance from origin ‖θ‖", "parameter unit"),
        VarSpec("diverged_epoch", ("run",), "int64", "epoch at which the loss became non-finite (-1: never)", "epoch",
                fill=-1),
    ]


def _own_entry(p: Path) -> bool:
    """gradlab's own leftovers in a train --out folder before its store exists: the lock file and the staging
    folders of a killed store creation, and an empty ``runs`` folder."""
    return (p.name == ".train.zarr.lock" or p.name.startswith(".train.zarr.tmp-")
            or (p.name == "runs" and p.is_dir() and not any(p.iterdir())))


def train_grid(cfg: TrainConfig, out: str | Path, *, resume: bool = False, show_progress: bool = True) -> Path:
    """Train every run of the grid into ``out`` (``train.zarr`` + ``runs/<name>/epochNNN.pt``); resumable."""
    out = Path(out)
    check_types(dict(cfg.__dict__), "config")
    data = load_data(cfg.data, root=cfg.data_root, download=cfg.download, collate=cfg.collate)
    if cfg.dtype is not None:
        if cfg.dtype not in ("float32", "float64"):
            raise UsageError(f"--dtype must be float32 or float64, got {cfg.dtype!r}")
        data = with_dtype(data, getattr(torch, cfg.dtype))
    names, kinds = layer_kinds(validate(cfg, data))
    store = out / "train.zarr"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new or empty) for the runs")
    if out.exists() and not store.exists() and any(not _own_entry(p) for p in out.iterdir()):
        raise UsageError(f"{out} holds other data (no train.zarr); choose an empty or new folder for --out")
    specs = expand_grid(cfg)
    config = {"kind": "train", **cfg.to_dict()}

    def create() -> None:
        create_store(
            store, kind="train",
            sizes={"run": len(specs), "epoch": cfg.epochs + 1, "layer": len(names), "group": len(GROUPS)},
            coords={
                "run": ("run", [s.name for s in specs], {"long_name": "run"}),
                "epoch": ("epoch", np.arange(cfg.epochs + 1), {"long_name": "epoch", "units": "epoch"}),
                "layer": ("layer", names, {"long_name": "parameter tensor"}),
                "param_kind": ("layer", kinds, {"long_name": "parameter kind"}),
                "group": ("group", list(GROUPS), {"long_name": "parameter group"}),
                "batch_size": ("run", [s.batch_size for s in specs], {"long_name": "batch size", "units": "examples"}),
                "lr": ("run", [s.lr for s in specs], {"long_name": "base learning rate", "units": "1"}),
                "seed": ("run", [s.seed for s in specs], {"long_name": "seed"}),
                "optimizer": ("run", [s.optimizer for s in specs], {"long_name": "optimizer"}),
                "run_dir": ("run", [f"runs/{s.name}" for s in specs], {"long_name": "checkpoint folder"}),
            },
            variables=_store_variables(loss_name(cfg.loss or data.loss)), unit_dims=("run",), chunks={"run": 1},
            config=config,
            attrs={"dataset": data.name, "model": cfg.model, "lr_scaling": cfg.lr_scaling,
                   "loss": loss_name(cfg.loss or data.loss),
                   "task": task_record(data=cfg.data, loss=loss_name(cfg.loss or data.loss), model=cfg.model,
                                       collate=cfg.collate),
                   "checkpoint_epochs": list(checkpoint_epochs(cfg)), "n_train": len(data.train)},
        )

    with writer_for(store, resume=resume, config=config, create=create) as writer:
        done = writer.done()
        todo = [s for s in specs if not done[s.index]]
        try:
            _train_todo(cfg, data, todo, out, writer, show_progress)
        except BaseException:
            if not writer.done().any():  # the store is removed (nothing done): so are its checkpoints
                shutil.rmtree(out / "runs", ignore_errors=True)
            raise
    return store


def _train_todo(cfg: TrainConfig, data: DataBundle, todo: list[RunSpec], out: Path, writer: Any,
                show_progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo) * cfg.epochs, desc="train", unit="epoch", disable=not show_progress,
               file=None, dynamic_ncols=True)
    with bar:
        for spec in todo:
            run_dir = out / "runs" / spec.name
            if run_dir.exists():  # a crashed earlier attempt: its checkpoints are rewritten identically
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            res = train_run(cfg, data, spec, run_dir, progress=bar)
            for name, values in res.items():
                writer.write(name, {"run": spec.index}, values)
            writer.mark_done({"run": spec.index})


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

