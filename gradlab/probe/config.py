"""The resolved config of ``gradlab probe``: every input checked before anything is written.

:func:`resolve_config` loads the data and every checkpoint (and init) to check that the weights fit the model, that
all checkpoints share one parameter layout and that ``params`` selects at least one tensor, and returns a frozen
:class:`ProbeConfig`: everything the numbers depend on (its JSON is hashed into the store).  Trial t draws its
examples from ``SeedSequence([seed, t])`` -- the same at every checkpoint, ``draws="common"`` -- or
``SeedSequence([seed, c, t])`` (``draws="independent"``) (:mod:`gradlab.probe.sampling`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.checkpoint_set import load_checkpoint_set, parse_checkpoint_arg, refuse_dropout  # noqa: F401 - re-exported
from gradlab.devices import check_device
from gradlab.errors import UsageError
from gradlab.probe.sampling import DRAWS, seed_derivation

log = logging.getLogger(__name__)

PROTOCOLS = ("step", "frozen")
REDUCTIONS = ("mean", "sum")
KEEPS = ("norms", "histograms", "vectors")
DTYPES = ("float32", "float64")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # divisors of the default budget
UNIT_TARGET_TRIALS = 8
GRAD_SUM_CHUNK_BYTES = 256 * 2**20
SEED_DERIVATION = seed_derivation("common")  # the default; a store records its own (attrs["seed_derivation"])


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
    draws: str = "common"  # gradlab.probe.sampling.DRAWS: same examples at every checkpoint, or independent
    # parameters with requires_grad=False: never selected, never stepped (as training keeps them); in the config
    # (hashed) only when there are some, so stores of models without frozen parameters keep their config
    frozen: tuple[str, ...] = ()
    # what the run dtype cast (attrs only: the dtype itself is in the config), e.g. "model float32 -> float64"
    dtype_cast: str = "none"
    # SHA-256 of the training split's tensors as resolve_config loaded them (not in the config: the store records
    # it in attrs["task_sha256"], and a resume after the data changed is refused); "" when unknown
    data_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoints"] = [asdict(c) for c in self.checkpoints]
        if not d["frozen"]:
            del d["frozen"]
        del d["dtype_cast"], d["data_sha256"]
        return d

    @property
    def model_kwargs(self) -> dict[str, Any] | None:
        return json.loads(self.model_kwargs_json)

    @property
    def model_mode(self) -> str:
        return model_mode(self.protocol)

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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def model_mode(protocol: str) -> str:
    """The mode the protocol runs the model in: step as SGD training does (train), frozen at fixed θ (eval)."""
    return "eval" if protocol == "frozen" else "train"


MODE_NOTES = {
    "train": "the step protocol runs the model in train mode, as SGD does: batch norm normalises each minibatch of "
             "m examples with its own statistics (running statistics neither used nor updated)",
    "eval": "the frozen protocol runs the model in eval mode: batch norm uses its running statistics (examples "
            "stay independent) and dropout is off",
}


def _floating_dtypes(tensors: Any) -> set[str]:
    import torch

    return {str(t.dtype).removeprefix("torch.") for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}


def resolve_dtype(requested: str | None, model_dtypes: set[str], data_dtypes: set[str]) -> tuple[str, str, str]:
    """The run dtype, what it casts, and the one-line notice (``""`` when nothing is cast).

    ``requested`` None (auto): float64 when the model's parameters (or the checkpoint's tensors) or the data's
    floating tensors are float64, else float32 -- the widest of the two, so a cast only ever widens (exactly)."""
    from gradlab.store import option

    chosen = requested or ("float64" if "float64" in model_dtypes | data_dtypes else "float32")
    width = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}
    casts, parts, narrows = [], [], False
    for what, ds in (("model", model_dtypes), ("data", data_dtypes)):
        other = [d for d in sorted(ds) if d != chosen]
        casts += [f"{what} {d} -> {chosen}" for d in other]
        if other:
            parts.append(f"the {what}'s {'/'.join(other)} tensors")
            narrows |= any(width.get(d, 0) > width[chosen] for d in other)
    if not casts:
        return chosen, "none", ""
    cast = "; ".join(casts)
    how = " (rounding them: they lose precision)" if narrows else " (exactly)"
    if requested:
        note = f"computing in {chosen} as {option('dtype', chosen)} asks: casting {' and '.join(parts)} to {chosen}{how}"
    else:
        other = "float32" if chosen == "float64" else "float64"
        note = (f"computing in {chosen}, the widest floating dtype of the model and the data: casting "
                f"{' and '.join(parts)} to {chosen}{how}; pass {option('dtype', other)} to compute in {other}")
    return chosen, cast + (" (requested)" if requested else " (auto: the widest of model and data)"), note


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
    dtype: str | None = None,
    replacement: bool = False,
    trials_per_unit: int | None = None,
    loss: str | None = None,
    collate: str | None = None,
    draws: str = "common",
    init_option: str | None = None,
) -> ProbeConfig:
    """Check every input and resolve the full config; raise :class:`UsageError` (naming the fix) on bad input.

    Messages name options as the caller spells them (:func:`gradlab.store.option`: ``--budget`` on the command
    line, ``budget=`` in :func:`gradlab.api.probe`); ``init_option`` overrides how ``init`` is named.

    ``dtype``: ``"float32"``, ``"float64"`` or None (the default): the widest floating dtype of the model (its
    parameters and the checkpoint's tensors) and of the data, so float32 models on float32 data run in float32 and
    nothing is narrowed behind the user's back; any cast is said once on stderr and recorded (``dtype_cast``).

    Parameters with ``requires_grad=False`` (frozen by the model's factory) are left out of ``params``' selection
    and held fixed by the step protocol, as training keeps them; said once on stderr and recorded (``frozen``).

    Nothing is written.  Loads the data and every checkpoint (and init) to check that the weights fit the model,
    that all checkpoints share one parameter layout, and that ``params`` (a regex searched in parameter names)
    selects at least one tensor.
    """
    import torch

    from gradlab.checkpoint import build_model_from, load_checkpoint
    from gradlab.datasets import load_data
    from gradlab.probe.distance import find_init
    from gradlab.store import option
    from gradlab.task import (LOSSES, batch_norm_modules, check_task, data_sha256, loss_name, resolve_loss,
                              single_example_batch_norm, source_sha256, tensor_leaves)

    init_option = init_option or option("init")
    _check_choice("protocol", protocol, PROTOCOLS)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("keep", keep, KEEPS)
    if dtype is not None:
        _check_choice("dtype", dtype, DTYPES)
    _check_choice("draws", draws, DRAWS)
    check_device(device)
    if not checkpoints:
        raise UsageError("no checkpoint given; pass --checkpoint PATH (repeatable, or LABEL=PATH)"
                         if option("checkpoint").startswith("--") else "no checkpoint given; pass at least one "
                         "checkpoint: a path, an nn.Module, or a mapping label -> either")
    sizes = [int(m) for m in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if len(set(sizes)) != len(sizes):
        raise UsageError(f"batch sizes repeat: {sizes}; give each once")
    if budget < 1:
        raise UsageError(f"{option('budget')} must be >= 1, got {budget}")
    bad = [m for m in sizes if budget % m]
    if bad:
        raise UsageError(f"batch sizes {bad} do not divide the budget {budget}: every trial splits its {budget} "
                         f"examples into budget/m minibatches; pick divisors of {option('budget')} (in "
                         f"{option('batch_sizes')}) or change {option('budget')}")
    if trials < 1:
        raise UsageError(f"{option('trials')} must be >= 1, got {trials}")
    if seed < 0:
        raise UsageError(f"{option('seed')} must be a non-negative integer, got {seed}")
    if not math.isfinite(lr):
        raise UsageError(f"{option('lr')} must be a finite number, got {lr}")
    if lr < 0:
        raise UsageError(f"{option('lr')} must be >= 0 (an SGD learning rate; 0 keeps every step at θ), got {lr}")
    try:
        pattern = re.compile(params)
    except re.error as exc:
        raise UsageError(f"{option('params')} {params!r} is not a valid regular expression: {exc}") from None

    if loss is not None:
        resolve_loss(loss)  # an unknown name fails before the data loads
    bundle = load_data(data, collate=collate)
    loss = loss_name(loss or bundle.loss)
    loss_fn = resolve_loss(loss)
    pool_size = len(bundle.train)
    if not replacement and budget > pool_size:
        raise UsageError(f"{option('budget')} {budget} exceeds the {pool_size} training examples of {data!r}; "
                         f"draws are without replacement: lower {option('budget')} or pass "
                         f"{option('replacement', True)}")

    specs: list[CheckpointSpec] = []
    layout: list[tuple[str, tuple[int, ...]]] | None = None
    frozen: tuple[str, ...] = ()
    model_dtypes: set[str] = set()
    run_dtype = dtype or "float32"
    dtype_cast, dtype_note = "none", ""
    for i, label, path, ckpt, net in load_checkpoint_set(checkpoints, model=model, model_kwargs=model_kwargs,
                                                         bundle=bundle, what="probe"):
        model_dtypes |= _floating_dtypes(ckpt.state_dict.values()) | _floating_dtypes(net.parameters())
        if i == 0:
            layout = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
            frozen = tuple(n for n, p in net.named_parameters() if not p.requires_grad)
            if protocol == "step":
                refuse_dropout(net, "the step protocol runs the model in train mode, as SGD does, and cannot replay "
                               "dropout's randomness trial by trial: build the model with dropout 0, or use "
                               f"{option('protocol', 'frozen')}, which runs it in eval mode (dropout off, batch "
                               "norm on its running statistics)")
            run_dtype, dtype_cast, dtype_note = resolve_dtype(
                dtype, model_dtypes, _floating_dtypes(tensor_leaves(bundle.train.batch)))
            check_task(net, loss_fn, bundle.train, name=loss, dtype=getattr(torch, run_dtype))
            if protocol == "step":
                single = single_example_batch_norm(net, loss_fn, bundle.train, sizes, dtype=getattr(torch, run_dtype))
                if single:
                    raise UsageError(
                        "batch norm in train mode needs at least 2 examples per batch: the step protocol normalises "
                        f"each minibatch with its own statistics, and batch size {single[0]} in "
                        f"{option('batch_sizes')} gives it one value per channel; drop it, or use "
                        f"{option('protocol', 'frozen')} (eval-mode batch norm)")
            if batch_norm_modules(net) or any(isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0
                                              for mod in net.modules()):
                log.warning("%s", MODE_NOTES[model_mode(protocol)])
        init_path = Path(init) if init else find_init(path, init_option)
        init_sha = ""
        if init_path is not None:
            ick = load_checkpoint(init_path)
            build_model_from(ick, model=model, model_kwargs=model_kwargs, input_shape=bundle.input_shape,
                             n_classes=bundle.n_classes)
            init_sha = _sha256(init_path)
        else:
            log.warning("no init checkpoint for %s (no %s and no checkpoint tagged 'init' beside it): "
                        "distances and cosines to init will be NaN", path, init_option)
        epoch = ckpt.meta.get("epoch")
        specs.append(CheckpointSpec(label, str(path.resolve()), _sha256(path),
                                    float(epoch) if isinstance(epoch, (int, float)) else float("nan"),
                                    str(init_path.resolve()) if init_path else "", init_sha))
    assert layout is not None
    if dtype is None and "float64" in model_dtypes:  # a later checkpoint in float64: widen, as for the first
        run_dtype, dtype_cast, dtype_note = resolve_dtype(
            None, model_dtypes, _floating_dtypes(tensor_leaves(bundle.train.batch)))
    if dtype_note:
        log.warning("%s", dtype_note)
    names = tuple(n for n, _ in layout)
    matched = tuple(n for n in names if pattern.search(n))
    if not matched:
        raise UsageError(f"{option('params')} {params!r} matches no parameter; the model has {list(names)}")
    selected = tuple(n for n in matched if n not in frozen)
    left_out = [n for n in matched if n in frozen]
    if not selected:
        trainable = [n for n in names if n not in frozen]
        raise UsageError(f"{option('params')} {params!r} matches only frozen parameters (requires_grad=False: "
                         f"{', '.join(left_out)}), which have no gradient in training; select trainable ones"
                         + (f" (the model's trainable parameters: {trainable})" if trainable else
                            ": every parameter of the model is frozen; unfreeze the ones to measure"))
    if left_out:
        log.warning("leaving out %d frozen parameter tensor(s) (requires_grad=False): %s; they are held fixed, as "
                    "training keeps them, and recorded in the store's attrs (frozen)", len(left_out),
                    ", ".join(left_out))
    layer_sizes = tuple(int(np.prod(s)) for _, s in layout)
    n_sel = sum(s for n, s in zip(names, layer_sizes) if n in selected)
    if trials_per_unit is None:
        per_trial = len(sizes) * n_sel * np.dtype(run_dtype).itemsize if keep == "vectors" else 1
        trials_per_unit = max(1, min(trials, UNIT_TARGET_TRIALS, GRAD_SUM_CHUNK_BYTES // max(per_trial, 1)))
    if trials_per_unit < 1:
        raise UsageError(f"{option('trials_per_unit')} must be >= 1, got {trials_per_unit}")
    return ProbeConfig(
        checkpoints=tuple(specs), data=data, model=model, model_kwargs_json=json.dumps(
            dict(model_kwargs) if model_kwargs is not None else None, sort_keys=True),
        batch_sizes=tuple(sorted(sizes)), budget=int(budget), trials=int(trials), protocol=protocol,
        reduction=reduction, lr=float(lr), params=params, keep=keep, seed=int(seed), device=device, dtype=run_dtype,
        replacement=bool(replacement), trials_per_unit=int(trials_per_unit), pool_size=pool_size,
        input_shape=tuple(bundle.input_shape), n_classes=int(bundle.n_classes), layers=names,
        layer_sizes=layer_sizes, selected=selected, loss=loss, collate=collate,
        loss_sha256=(source_sha256(loss_fn) or "") if loss not in LOSSES else "", draws=draws, frozen=frozen,
        dtype_cast=dtype_cast, data_sha256=data_sha256(bundle.train.batch))
