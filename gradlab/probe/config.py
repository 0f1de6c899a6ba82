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
    draws: str = "common",
    init_option: str = "--init",
) -> ProbeConfig:
    """Check every input and resolve the full config; raise :class:`UsageError` (naming the fix) on bad input.

    ``init_option``: how the caller's users name ``init`` in messages (``--init`` on the command line,
    ``init=`` in :func:`gradlab.api.probe`).

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
    _check_choice("draws", draws, DRAWS)
    check_device(device)
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
    for i, label, path, ckpt, net in load_checkpoint_set(checkpoints, model=model, model_kwargs=model_kwargs,
                                                         bundle=bundle, what="probe"):
        if i == 0:
            layout = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
            if protocol == "step":
                refuse_dropout(net, "the step probe needs a deterministic model: use --protocol frozen or dropout 0")
            check_task(net, loss_fn, bundle.train, name=loss, dtype=getattr(torch, dtype))
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
        loss_sha256=(source_sha256(loss_fn) or "") if loss not in LOSSES else "", draws=draws)
