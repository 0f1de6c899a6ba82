"""What every step engine takes and returns: validated inputs, per-block and per-call results, the engine interface.

An engine advances a block of T_b trials in lock-step (θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k), S = Σ_k ∇L_{B_k}(θ_k),
see :mod:`gradlab.probe.step`) and returns a :data:`BlockResult`: S per selected tensor (T_b, *shape), the
displacement ‖θ_{K+1} − θ‖ (T_b,), the per-step norms ‖∇L_{B_k}(θ_k)‖ (T_b, K) and the non-finite counts (T_b,).
Every engine is a final subclass of :class:`StepEngine`, built once per :func:`~gradlab.probe.step.step_trials` call
from a :class:`EngineSetup`, whose ``block(xb, yb, count)`` has one signature for all of them.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from gradlab.errors import UsageError
from gradlab.task import Batch, PerExampleLoss, batch_len, tensor_leaves, to_run

Reduction = Literal["mean", "sum"]

# S per selected tensor, displacement, step norms (T_b, K), non-finite counts: the output of one block
BlockResult = tuple[dict[str, Tensor], Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class StepResult:
    """Per-trial outputs of the step protocol (numpy arrays; T = number of trials, rows in ``indices`` order).

    - ``grad_sum``: selected parameter name -> S restricted to it, shape (T, *param.shape), compute dtype.
    - ``displacement``: ‖θ_end − θ‖ over all parameters, (T,) float64.
    - ``step_norm_mean`` / ``step_norm_std`` / ``step_norm_max``: mean, standard deviation (ddof 0) and maximum
      over the K = N/m steps of ‖∇L_{B_k}(θ_k)‖ over the selected parameters, (T,) float64.
    - ``nonfinite``: non-finite gradient entries met over all steps and all parameters, (T,) int64.
    """

    grad_sum: dict[str, np.ndarray]
    displacement: np.ndarray
    step_norm_mean: np.ndarray
    step_norm_std: np.ndarray
    step_norm_max: np.ndarray
    nonfinite: np.ndarray

    @property
    def n_trials(self) -> int:
        return int(self.displacement.shape[0])


@dataclass(frozen=True)
class StepInputs:
    """Validated arguments shared by the engine and the naive reference."""

    indices: Tensor  # (T, N) int64 on x.device
    batch_size: int
    lr: float
    reduction: Reduction
    selected: tuple[str, ...]

    @property
    def n_steps(self) -> int:
        return self.indices.shape[1] // self.batch_size


def check_step_inputs(
    model: nn.Module,
    x: Tensor | Batch,
    y: Tensor | None,
    indices: Tensor | np.ndarray,
    batch_size: int,
    lr: float,
    reduction: str,
    selected: Sequence[str],
    dtype: torch.dtype,
) -> StepInputs:
    """Validate the step-protocol arguments; raise :class:`UsageError` naming the problem and the fix."""
    if reduction not in ("mean", "sum"):
        raise UsageError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not (isinstance(lr, (int, float, np.floating)) and not isinstance(lr, bool) and math.isfinite(lr)):
        raise UsageError(f"lr must be a finite number, got {lr!r}")
    if y is not None:
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise UsageError(f"expected x of shape (n, ...) and labels y of shape (n,), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        pool = int(x.shape[0])
        device = x.device
    else:  # x is a batch pytree of the whole pool (gradlab.task)
        pool = batch_len(x)
        device = tensor_leaves(x)[0].device
    idx = torch.as_tensor(indices)
    if idx.ndim != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise UsageError(f"indices must be an integer array of shape (trials, N), got {tuple(idx.shape)} {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= pool):
        raise UsageError(f"indices must lie in [0, {pool}) (the training-set size), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    n_budget = idx.shape[1]
    if n_budget < 1:
        raise UsageError("indices must hold at least one example per trial (shape (trials, N) with N >= 1)")
    if isinstance(batch_size, np.integer):
        batch_size = int(batch_size)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1 or n_budget % batch_size:
        raise UsageError(f"batch_size must be a positive divisor of the budget N = {n_budget}, got {batch_size!r}; "
                         "pick batch sizes that divide N")
    names = [n for n, _ in model.named_parameters()]
    sel = tuple(selected)
    if not sel:
        raise UsageError(f"select at least one parameter; available: {names}")
    unknown = [s for s in sel if s not in names]
    if unknown:
        raise UsageError(f"unknown parameter(s) {unknown}; available: {names}")
    if len(set(sel)) != len(sel):
        raise UsageError(f"selected parameters repeat a name: {list(sel)}")
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise UsageError(f"model has active dropout ({type(mod).__name__}, p={mod.p}); the step probe needs a "
                             "deterministic model: build it with dropout 0")
    return StepInputs(idx, batch_size, float(lr), reduction, sel)  # type: ignore[arg-type]


def summarise_step_norms(step_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std (ddof 0) and max over steps (axis 1) of per-step norms (T, K); NaN anywhere gives NaN."""
    s = np.asarray(step_norms, dtype=np.float64)
    return s.mean(axis=1), s.std(axis=1), s.max(axis=1)


def block_outputs(tb: int, theta: dict[str, Tensor], inp: StepInputs, like: Tensor,
                  reuse: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Zeroed per-block outputs of every engine: S per selected tensor (Tb, *shape), step norms (Tb, K) and
    non-finite counts (Tb,), in ``like``'s dtype and device.  S goes into the first Tb rows of ``reuse`` if given."""
    if reuse is not None:
        sums = {n: reuse[n][:tb].zero_() for n in inp.selected}
    else:
        sums = {n: torch.zeros(tb, *theta[n].shape, dtype=like.dtype, device=like.device) for n in inp.selected}
    step_norms = torch.zeros(tb, inp.n_steps, dtype=like.dtype, device=like.device)
    return sums, step_norms, torch.zeros(tb, dtype=torch.long, device=like.device)


def all_finite(res: BlockResult) -> bool:
    """Whether a block's S, displacement and step norms are all finite (then no gradient entry was non-finite,
    provided lr != 0: a non-finite update leaves θ non-finite for good)."""
    return bool(torch.isfinite(res[1]).all()) and bool(torch.isfinite(res[2]).all()) and all(
        bool(torch.isfinite(s).all()) for s in res[0].values())


@dataclass(frozen=True)
class EngineSetup:
    """Everything an engine is built from, once per :func:`~gradlab.probe.step.step_trials` call.

    ``model`` is the caller's (never mutated), ``theta`` its parameters copied to ``device``/``dtype``."""

    model: nn.Module
    theta: dict[str, Tensor]
    inp: StepInputs
    loss: PerExampleLoss
    dtype: torch.dtype
    device: torch.device
    trials_per_block: int


class StepEngine(abc.ABC):
    """One step engine, prepared for one call: ``gather`` a block's examples, then ``block`` advances its trials.

    ``count_always``: whether ``block`` counts non-finite entries whatever its ``count`` (then the caller asks for
    counts up front instead of rerunning a non-finite block with ``count=True``).
    """

    count_always: ClassVar[bool] = False

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup

    def gather(self, x: Tensor | Batch, y: Tensor | None, rows: Tensor) -> tuple[Tensor | Batch, Tensor | None]:
        """The examples of a block's trials, rows (Tb, N): x as (Tb, N, ...) (or a pytree of such leaves, floating
        leaves in the compute dtype, integer leaves as they are) and y as (Tb, N) int64, on the compute device."""
        s = self.setup
        tb, n_budget = rows.shape
        flat = rows.reshape(-1)
        if y is not None:
            xb = x[flat].to(device=s.device, dtype=s.dtype).reshape(tb, n_budget, *x.shape[1:])
        else:
            xb = tree_map(lambda t: to_run(t[flat.to(t.device)], device=s.device, dtype=s.dtype).reshape(
                tb, n_budget, *t.shape[1:]) if isinstance(t, Tensor) else t, x)
        return xb, gather_labels(y, rows, s.device)

    @abc.abstractmethod
    def block(self, xb: Tensor | Batch, yb: Tensor | None, count: bool) -> BlockResult:
        """Advance the block's trials through their K = N/m steps; with ``count`` count non-finite entries."""


def gather_labels(y: Tensor | None, rows: Tensor, device: torch.device) -> Tensor | None:
    """y[rows] as (Tb, N) int64 on ``device`` (None stays None)."""
    if y is None:
        return None
    return y[rows.reshape(-1)].to(device=device, dtype=torch.long).reshape(rows.shape)


def train_copy(setup: EngineSetup) -> nn.Module:
    """A private copy of the model on the compute device and dtype, in train mode, whose batch-norm layers
    normalise each minibatch with its own statistics and keep no running statistics
    (``torch.func.replace_all_batch_norm_modules_``)."""
    from torch.func import replace_all_batch_norm_modules_

    net = copy.deepcopy(setup.model).to(device=setup.device, dtype=setup.dtype)
    return replace_all_batch_norm_modules_(net).train()
