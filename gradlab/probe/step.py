"""The step protocol ("gradient competition", SCIENCE.md): T trials of N/m SGD steps each, advanced in lock-step.

From θ at a checkpoint, trial t takes its N drawn examples ``indices[t]``, splits them into K = N/m consecutive
minibatches B_1..B_K and runs plain SGD (no momentum, no weight decay) with learning rate η::

    θ_1 = θ,   θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k),   S = Σ_k ∇L_{B_k}(θ_k),

where L_B is the cross-entropy over B with reduction ``mean`` (L = (1/m) Σ_{i∈B} ℓᵢ) or ``sum`` (L = Σ_{i∈B} ℓᵢ).
Recorded per trial: S restricted to the selected parameter tensors, the displacement ‖θ_{K+1} − θ‖ over all
parameters (note θ_{K+1} − θ = −η S), the mean / std (ddof 0) / max over the K steps of ‖∇L_{B_k}(θ_k)‖ over the
selected parameters, and the number of non-finite gradient entries met, Σ_k #{j : ∇_j L_{B_k}(θ_k) ∉ ℝ} over all
parameters.  Non-finite values never raise: the trial keeps stepping, its numbers become NaN, the count stays
exact.  (Blog: "gradient competition"; McCandlish et al. 2018 for why ‖S‖ tracks the gradient noise scale.)

Three engines compute the same numbers (tested against :func:`gradlab.probe.naive.naive_step_trials` in float64):

- ``chain``: models that are a chain of ``nn.Linear`` and ``nn.ReLU`` (gradlab's MLP without batch norm, or an
  ``nn.Sequential`` of Flatten/Linear/ReLU).  Each block of trials keeps per-trial weight copies (T_b, out, in),
  runs forward and a hand-written backward with batched matmuls (``baddbmm``/``bmm``) and applies the SGD update
  in place.  For weights whose gradient is not recorded the update is fused into the weight-gradient GEMM, or, at
  small m on large weights, kept as pending low-rank factors that are folded in with one GEMM every R/m steps
  (``_LowRankUpdates``: same sums in a different order).  No Python loop over trials.  Blocks of 2 trials keep
  the per-trial weights in cache on a 2-core CPU (PERF-NOTES.md).  Non-finite entries are only counted when a
  block's results turn out non-finite: the block is then rerun with every gradient formed and counted.
- ``loop``: any other model on CPU (the default there): trial after trial on one private copy with
  ``torch.autograd.grad`` and ``torch._foreach`` updates -- the blog's loop without its per-trial model copy,
  optimizer object and per-step non-finite passes (counted only when a trial's results turn out non-finite, as
  above).  On CPU, ``vmap`` over trials ran at 0.5-0.85x the blog's loop for conv nets (cnn, resnet-8 on
  32x32 inputs, ``benchmarks/bench_step_conv.py``), the loop at 1.04-1.15x, so trials are not batched there.
- ``generic``: any other model on other devices (the default there), via ``torch.func.functional_call`` +
  ``vmap(grad)`` over stacked per-trial parameters.

Model mode: the probe runs the model as SGD training does (train mode).  Batch-norm layers normalise each
minibatch with its own statistics; their running statistics are neither used nor updated (the loop and
generic engines work on a copy passed through ``torch.func.replace_all_batch_norm_modules_``).  Models with
active dropout are refused with :class:`~gradlab.errors.UsageError`: their randomness cannot be reproduced trial by trial.  Every
parameter is stepped, whatever its ``requires_grad``.  The caller's model is never mutated.

Example (lr = 0: S is the sum of the minibatch gradients at θ, i.e. Σᵢ gᵢ / m for mean reduction)::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 2)).double()
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1] * 4)
    >>> r = step_trials(net, x, y, torch.arange(8)[None], batch_size=2, lr=0.0, reduction="mean",
    ...                 selected=["0.bias"], dtype=torch.float64)
    >>> p = (torch.softmax(net(x), 1) - nn.functional.one_hot(y, 2)).detach()  # per-example bias gradients
    >>> bool(abs(r.grad_sum["0.bias"][0] - p.sum(0).numpy() / 2).max() < 1e-12)
    True
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from gradlab.errors import UsageError
from gradlab.task import Batch, PerExampleLoss, batch_len, tensor_leaves, to_run
from gradlab.task import cross_entropy as task_cross_entropy

log = logging.getLogger(__name__)

Reduction = Literal["mean", "sum"]
Engine = Literal["auto", "chain", "loop", "generic"]

DEFAULT_TRIALS_PER_BLOCK = {"cpu": 2, "cuda": 32}  # cpu: measured (PERF-NOTES); cuda: not measured yet


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


# ----------------------------------------------------------------------------------------------------------------
# chain engine: Linear/ReLU chains with batched matmuls and a hand-written backward


@dataclass(frozen=True)
class _Linear:
    weight: str
    bias: str | None


_Op = _Linear | None  # None stands for ReLU


def chain_ops(model: nn.Module) -> list[_Op] | None:
    """The model as a list of Linear/ReLU ops if it is a plain chain the fast engine handles, else ``None``.

    Accepted: gradlab's ``MLP`` without batch norm (``forward`` = ``layers(x.flatten(1))``), or an exact
    ``nn.Sequential`` of ``nn.Linear``/``nn.ReLU`` optionally starting with ``nn.Flatten()`` (then x may have any
    shape; without it x must be 2-D, checked by the caller).
    """
    from gradlab.models.mlp import MLP

    if type(model) is MLP:
        named = [(f"layers.{i}", mod) for i, mod in enumerate(model.layers)]
    elif type(model) is nn.Sequential:
        named = [(str(i), mod) for i, mod in enumerate(model)]
        if named and type(named[0][1]) is nn.Flatten:
            if (named[0][1].start_dim, named[0][1].end_dim) != (1, -1):
                return None
            named = named[1:]
    else:
        return None
    ops: list[_Op] = []
    for name, mod in named:
        if type(mod) is nn.ReLU:
            ops.append(None)
        elif type(mod) is nn.Linear:
            ops.append(_Linear(f"{name}.weight", f"{name}.bias" if mod.bias is not None else None))
        else:
            return None
    if not any(op is not None for op in ops) or list(model.buffers()):
        return None
    return ops


def _is_flat_chain(model: nn.Module) -> bool:
    return not (type(model) is nn.Sequential and not (len(model) and type(model[0]) is nn.Flatten))


class _LowRankUpdates:
    """Pending SGD updates of one weight, W_true = W − η U Vᵀ, flushed into W with one GEMM every R/m steps.

    A rank-m update W ← W − η gᵀa rewrites the whole (out, in) matrix every step, which at small m costs more
    memory traffic than the forward and backward products together.  Keeping the last few updates as thin factors
    (U = gᵀ columns, V = aᵀ columns) changes only the order of the additions: x W_trueᵀ = x Wᵀ − η (x V) Uᵀ and
    g W_true = g W − η (g U) Vᵀ.  When the weight is recorded, the flush also adds U Vᵀ into its S, and the step's
    gradient norm comes from m×m Gram matrices, ‖gᵀa‖² = Σ (g gᵀ) ⊙ (a aᵀ), so the (out, in) gradient is never
    formed.
    """

    def __init__(self, weight: Tensor, rank: int, lr: float, grad_sum: Tensor | None = None) -> None:
        tb, out, inp = weight.shape
        self.weight, self.grad_sum, self.lr = weight, grad_sum, lr
        # factors stored row by row (Uᵀ: (Tb, R, out), Vᵀ: (Tb, R, in)) so that a push is a contiguous copy
        self.ut = weight.new_zeros(tb, rank, out)
        self.vt = weight.new_zeros(tb, rank, inp)
        self.r = 0

    def forward_add(self, h: Tensor, a: Tensor) -> None:
        if self.r:
            h.baddbmm_(torch.bmm(a, self.vt[:, :self.r].transpose(1, 2)), self.ut[:, :self.r], alpha=-self.lr)

    def backward_add(self, g_in: Tensor, g: Tensor) -> None:
        if self.r:
            g_in.baddbmm_(torch.bmm(g, self.ut[:, :self.r].transpose(1, 2)), self.vt[:, :self.r], alpha=-self.lr)

    def push(self, g: Tensor, a: Tensor) -> None:
        m = g.shape[1]
        if self.r + m > self.ut.shape[1]:
            self.flush()
        self.ut[:, self.r:self.r + m] = g
        self.vt[:, self.r:self.r + m] = a
        self.r += m

    def flush(self) -> None:
        if self.r:
            _apply_updates(self.weight, self.grad_sum, self.ut[:, :self.r], self.vt[:, :self.r], self.lr)
            self.r = 0


def _apply_updates(weight: Tensor, grad_sum: Tensor | None, gt: Tensor, at: Tensor, lr: float) -> None:
    """W ← W − η Σ gᵀa and S ← S + Σ gᵀa (if recorded) for r pending rows gt (Tb, r, out), at (Tb, r, in): one GEMM
    each."""
    u = gt.transpose(1, 2)
    weight.baddbmm_(u, at, alpha=-lr)
    if grad_sum is not None:
        grad_sum.baddbmm_(u, at)


class _InputWindow:
    """The first Linear layer, whose inputs are the data and so known in advance, run a window of K = R/m steps at a
    time.

    At a window's start the pending updates are flushed into W (one GEMM, as in :class:`_LowRankUpdates`), and two
    GEMMs over the window's K·m inputs X_w give P = X_w Wᵀ and the Gram X_w X_wᵀ.  Step j of the window then needs no
    product with W at all: x_j W_jᵀ = P_j − η Σ_{s<j} (x_j · x_s) g_s, a (m × jm) slice of the Gram times the
    window's gradients so far.  W is read once per window instead of once per step, which is what bounds the
    first layer at small m (the products are thin and memory-bound).  Only the order of additions changes.
    """

    def __init__(self, weight: Tensor, xb: Tensor, m: int, rank: int, lr: float, grad_sum: Tensor | None) -> None:
        self.weight, self.xb, self.m, self.lr, self.grad_sum = weight, xb, m, lr, grad_sum
        self.k_win = rank // m
        self.ut = weight.new_empty(weight.shape[0], self.k_win * m, weight.shape[1])  # the window's gᵀ, row-wise
        self.r = 0
        self.p: Tensor | None = None
        self.gram: Tensor | None = None
        self.xw: Tensor | None = None

    def flush(self) -> None:
        if self.r:
            assert self.xw is not None
            _apply_updates(self.weight, self.grad_sum, self.ut[:, :self.r], self.xw[:, :self.r], self.lr)
            self.r = 0

    def forward(self, k: int, bias: Tensor | None) -> Tensor:
        """Pre-activations of step k (steps must come in order), bias (Tb, 1, out) or None."""
        m, j = self.m, k % self.k_win
        if j == 0:
            self.flush()
            self.xw = self.xb[:, k * m:(k + self.k_win) * m]
            self.p = torch.bmm(self.xw, self.weight.transpose(1, 2))
            self.gram = torch.bmm(self.xw, self.xw.transpose(1, 2))
        assert self.p is not None and self.gram is not None
        rows = slice(j * m, (j + 1) * m)
        h = self.p[:, rows] + bias if bias is not None else self.p[:, rows].clone()
        if j:
            h.baddbmm_(self.gram[:, rows, :j * m], self.ut[:, :j * m], alpha=-self.lr)
        return h

    def push(self, g: Tensor) -> None:
        self.ut[:, self.r:self.r + self.m] = g
        self.r += self.m


def _block_outputs(tb: int, theta: dict[str, Tensor], inp: StepInputs, like: Tensor,
                   reuse: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Zeroed per-block outputs of every engine: S per selected tensor (Tb, *shape), step norms (Tb, K) and
    non-finite counts (Tb,), in ``like``'s dtype and device.  S goes into the first Tb rows of ``reuse`` if given."""
    if reuse is not None:
        sums = {n: reuse[n][:tb].zero_() for n in inp.selected}
    else:
        sums = {n: torch.zeros(tb, *theta[n].shape, dtype=like.dtype, device=like.device) for n in inp.selected}
    step_norms = torch.zeros(tb, inp.n_steps, dtype=like.dtype, device=like.device)
    return sums, step_norms, torch.zeros(tb, dtype=torch.long, device=like.device)


def _outer_sq_norm(g: Tensor, a: Tensor) -> Tensor:
    """‖gᵀa‖_F² per trial from the m×m Grams of g (Tb, m, out) and a (Tb, m, in)."""
    return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))


# pending-update rank R of _LowRankUpdates; used for weights with min(out, in) > 2R when m <= R/8 (on the blog MLP,
# 2 threads: 1.6x faster at m = 4, 1.4x at m = 8, 1.3x slower at m = 16 than the fused GEMM update)
LOW_RANK = 64
# window of _InputWindow in rows (K = WINDOW_RANK / m steps); used for a first Linear layer with min(out, in) >
# WINDOW_RANK when K >= 4 (blog MLP, 2 threads, 8 trials: 16% faster at m = 2, 13% at m = 4, 8% at m = 8, same at
# m = 16; windows of 128-512 rows were no better)
WINDOW_RANK = 64


class _Workspace:
    """Buffers that every block of one :func:`step_trials` call reuses: per-trial weight copies, the selected
    tensors' S, and the gathered inputs, each for ``trials_per_block`` trials (a block uses the first Tb rows).

    A fresh multi-megabyte tensor costs a page fault per 4 KiB on first touch (≈ 1 µs each on the 2-core VMs,
    PERF-NOTES.md); for the blog MLP at m = 16, allocating these per block and forming θ_end − θ out of place took
    a sixth of the engine's time.
    """

    def __init__(self, theta: dict[str, Tensor], selected: Sequence[str], tpb: int) -> None:
        self.weights = {n: t.new_empty(tpb, *((1, t.numel()) if t.ndim == 1 else t.shape)) for n, t in theta.items()}
        self.sums = {n: theta[n].new_empty(tpb, *theta[n].shape) for n in selected}
        self.inputs: Tensor | None = None

    def gather(self, x: Tensor, rows: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """x[rows] (rows (Tb, N)) as (Tb, N, *x.shape[1:]) in ``dtype`` on ``device``, into the reused buffer when x
        already has that dtype and device."""
        tb, n = rows.shape
        if x.dtype != dtype or x.device != device:
            return x[rows.reshape(-1)].to(device=device, dtype=dtype).reshape(tb, n, *x.shape[1:])
        tpb = next(iter(self.weights.values())).shape[0]
        if self.inputs is None:
            self.inputs = x.new_empty(tpb * n, *x.shape[1:])
        out = self.inputs[:tb * n]
        torch.index_select(x, 0, rows.reshape(-1).to(x.device), out=out)
        return out.view(tb, n, *x.shape[1:])


def _chain_block(
    ops: list[_Op],
    theta: dict[str, Tensor],
    xb: Tensor,
    onehot: Tensor,
    inp: StepInputs,
    count: bool,
    ws: _Workspace,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """Run one block of trials; xb (Tb, N, d_in), onehot (Tb, N, C).  Returns S, displacement, step norms, counts
    (S as views of ``ws``: copy them out before the next block).

    With ``count`` every gradient is formed explicitly and its non-finite entries are counted; otherwise the
    updates of unrecorded weights are fused into a GEMM or kept as pending low-rank factors.
    """
    tb, m, lr = xb.shape[0], inp.batch_size, inp.lr
    # per-trial copies: weights (Tb, out, in), biases (Tb, 1, out) so that they broadcast in baddbmm
    base = {n: t.unsqueeze(0) if t.ndim == 2 else t.view(1, 1, -1) for n, t in theta.items()}
    w = {n: ws.weights[n][:tb].copy_(b.expand(tb, *b.shape[1:])) for n, b in base.items()}
    flat_sums, step_norms, bad = _block_outputs(tb, theta, inp, xb, ws.sums)
    sums = {n: v.view(w[n].shape) for n, v in flat_sums.items()}  # views: biases as (Tb, 1, out)
    explicit = set(theta) if count else set(inp.selected)
    first_linear = next(i for i, op in enumerate(ops) if op is not None)
    op0 = ops[first_linear]
    assert op0 is not None
    window = None
    if not count and first_linear == 0 and 4 * m <= WINDOW_RANK and min(w[op0.weight].shape[1:]) > WINDOW_RANK:
        window = _InputWindow(w[op0.weight], xb, m, WINDOW_RANK, lr, sums.get(op0.weight))
    lazy = {op.weight: _LowRankUpdates(w[op.weight], LOW_RANK, lr, sums.get(op.weight)) for op in ops
            if op is not None and not count and 8 * m <= LOW_RANK and min(w[op.weight].shape[1:]) > 2 * LOW_RANK
            and not (window is not None and op is op0)}

    for k in range(inp.n_steps):
        sl = slice(k * m, (k + 1) * m)
        acts = [xb[:, sl]]
        for i, op in enumerate(ops):
            h = acts[-1]
            if op is None:
                h = torch.relu(h) if i <= first_linear else h.relu_()  # never write into the input block
            elif i == 0 and window is not None:
                h = window.forward(k, w[op.bias] if op.bias is not None else None)
            else:
                a = h
                if op.bias is None:
                    h = torch.bmm(a, w[op.weight].transpose(1, 2))
                else:
                    h = torch.baddbmm(w[op.bias], a, w[op.weight].transpose(1, 2))
                if op.weight in lazy:
                    lazy[op.weight].forward_add(h, a)
            acts.append(h)
        g = torch.log_softmax(acts[-1], dim=-1).exp_().sub_(onehot[:, sl])  # dℓ/dz = softmax(z) − e_y
        if inp.reduction == "mean":
            g.mul_(1.0 / m)
        sq = torch.zeros(tb, dtype=xb.dtype, device=xb.device)

        def account(name: str, d: Tensor) -> None:
            if count:
                bad.add_((~torch.isfinite(d)).flatten(1).sum(1))
            if name in sums:
                sums[name].add_(d)
                sq.add_(torch.linalg.vector_norm(d.flatten(1), dim=1).square())

        for i in range(len(ops) - 1, first_linear - 1, -1):
            op = ops[i]
            if op is None:  # same rule as autograd's relu backward: zero where the output is <= 0
                g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0)
                continue
            weight, a_in = w[op.weight], acts[i]
            g_in = None
            if i > first_linear:  # before the update: uses θ_k
                g_in = torch.bmm(g, weight)
                if op.weight in lazy:
                    lazy[op.weight].backward_add(g_in, g)
            if i == 0 and window is not None:
                window.push(g)
                if op.weight in sums:
                    sq.add_(_outer_sq_norm(g, a_in))
            elif op.weight in lazy:
                lazy[op.weight].push(g, a_in)
                if op.weight in sums:
                    sq.add_(_outer_sq_norm(g, a_in))
            elif op.weight in explicit:
                d = torch.bmm(g.transpose(1, 2), a_in)
                account(op.weight, d)
                weight.add_(d, alpha=-lr)
            else:  # fused SGD update inside the GEMM: W ← W − η gᵀa
                weight.baddbmm_(g.transpose(1, 2), a_in, alpha=-lr)
            if op.bias is not None:
                d = g.sum(1, keepdim=True)
                if op.bias in explicit:
                    account(op.bias, d)
                w[op.bias].add_(d, alpha=-lr)
            g = g_in
        step_norms[:, k] = sq.sqrt()
    for pending in [*lazy.values(), *([window] if window is not None else [])]:
        pending.flush()

    # in place: θ_end − θ over the block's own copies (a fresh (Tb, out, in) difference costs page faults)
    disp_sq = sum(torch.linalg.vector_norm(w[n].sub_(base[n]).flatten(1), dim=1).square() for n in theta)
    return flat_sums, disp_sq.sqrt(), step_norms, bad


# ----------------------------------------------------------------------------------------------------------------
# generic engine: torch.func over stacked per-trial parameters


def _generic_block(
    net: nn.Module,
    theta: dict[str, Tensor],
    xb: Batch,
    yb: Tensor | None,
    inp: StepInputs,
    loss: PerExampleLoss,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """One block with ``vmap(grad)``; xb (Tb, N, ...), yb (Tb, N) -- or xb a batch pytree of (Tb, N, ...) leaves and
    yb None.  Non-finite entries are always counted."""
    from torch.func import functional_call, grad, vmap

    batch = xb if yb is None else (xb, yb)
    like = tensor_leaves(theta)[0]
    tb, m, lr = next(iter(tensor_leaves(batch))).shape[0], inp.batch_size, inp.lr
    objective = _ReducedLoss(net, loss, inp.reduction)

    def loss_of(params: dict[str, Tensor], mb: Batch) -> Tensor:
        return functional_call(objective, {f"net.{n}": p for n, p in params.items()}, (mb,))

    grad_fn: Callable[..., dict[str, Tensor]] = vmap(grad(loss_of))
    params = {n: t.expand(tb, *t.shape).clone() for n, t in theta.items()}
    sums, step_norms, bad = _block_outputs(tb, theta, inp, like)
    for k in range(inp.n_steps):
        sl = slice(k * m, (k + 1) * m)
        grads = grad_fn(params, tree_map(lambda t: t[:, sl], batch))
        sq = torch.zeros(tb, dtype=like.dtype, device=like.device)
        for n, d in grads.items():
            bad.add_((~torch.isfinite(d)).flatten(1).sum(1))
            if n in sums:
                sums[n].add_(d)
                sq = sq + torch.linalg.vector_norm(d.flatten(1), dim=1).square()
            params[n].add_(d, alpha=-lr)
        step_norms[:, k] = sq.sqrt()
    disp_sq = sum(torch.linalg.vector_norm((params[n] - theta[n]).flatten(1), dim=1).square() for n in theta)
    return sums, disp_sq.sqrt(), step_norms, bad


class _ReducedLoss(nn.Module):
    """The minibatch loss L_B = (1/m) Σ ℓᵢ (mean) or Σ ℓᵢ (sum) of a per-example loss, as a module (so that
    ``torch.func.functional_call`` can swap the parameters of ``net``)."""

    def __init__(self, net: nn.Module, loss: PerExampleLoss, reduction: str) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.reduction = reduction

    def forward(self, batch: Batch) -> Tensor:
        return minibatch_loss(self.net, batch, self.loss, self.reduction)


def minibatch_loss(net: nn.Module, batch: Batch, loss: PerExampleLoss, reduction: str) -> Tensor:
    """L_B = (1/m) Σ ℓᵢ (mean) or Σ ℓᵢ (sum) over the minibatch ``batch``.  The built-in cross-entropy on (x, y)
    with logits (m, C) goes through ``F.cross_entropy(..., reduction=...)`` directly (the same arithmetic as before
    the task contract, so stores stay bitwise identical)."""
    if loss is task_cross_entropy and isinstance(batch, (tuple, list)) and len(batch) == 2 \
            and isinstance(batch[1], Tensor) and batch[1].ndim == 1:
        out = net(batch[0])
        if isinstance(out, Tensor) and out.ndim == 2:
            return F.cross_entropy(out, batch[1], reduction=reduction)
    per = loss(net, batch)
    return per.mean() if reduction == "mean" else per.sum()


# ----------------------------------------------------------------------------------------------------------------
# loop engine: trial after trial with autograd on one private copy


def _loop_block(
    net: nn.Module,
    theta: dict[str, Tensor],
    xb: Batch,
    yb: Tensor | None,
    inp: StepInputs,
    count: bool,
    loss: PerExampleLoss,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """The block's trials one after another; xb (Tb, N, ...), yb (Tb, N) -- or xb a batch pytree of (Tb, N, ...)
    leaves and yb None.  ``net`` is a private copy whose parameters are reset to θ for each trial.  With ``count``
    non-finite gradient entries are counted."""
    batch = xb if yb is None else (xb, yb)
    tb, m, lr = next(iter(tensor_leaves(batch))).shape[0], inp.batch_size, inp.lr
    names = list(theta)
    own = dict(net.named_parameters())
    params = [own[n] for n in names]
    sel = [names.index(n) for n in inp.selected]
    like = tensor_leaves(theta)[0]
    sums, step_norms, bad = _block_outputs(tb, theta, inp, like)
    disp_sq = torch.zeros(tb, dtype=like.dtype, device=like.device)
    for t in range(tb):
        for p, n in zip(params, names):
            p.requires_grad_(False).copy_(theta[n]).requires_grad_(True)
        acc = [sums[n][t] for n in inp.selected]
        for k in range(inp.n_steps):
            sl = slice(k * m, (k + 1) * m)
            with torch.enable_grad():
                value = minibatch_loss(net, tree_map(lambda v: v[t, sl], batch), loss, inp.reduction)
                grads = torch.autograd.grad(value, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if count:
                bad[t] += sum(int((~torch.isfinite(g)).sum()) for g in grads)
            picked = [grads[i] for i in sel]
            torch._foreach_add_(acc, picked)
            step_norms[t, k] = torch.stack(torch._foreach_norm(picked)).square().sum().sqrt()
            torch._foreach_add_(params, grads, alpha=-lr)
        disp_sq[t] = sum(torch.linalg.vector_norm(p - theta[n]).square() for p, n in zip(params, names))
    for p in params:
        p.requires_grad_(False)
    return sums, disp_sq.sqrt(), step_norms, bad


def _all_finite(res: tuple[dict[str, Tensor], Tensor, Tensor, Tensor]) -> bool:
    """Whether a block's S, displacement and step norms are all finite (then no gradient entry was non-finite,
    provided lr != 0: a non-finite update leaves θ non-finite for good)."""
    return bool(torch.isfinite(res[1]).all()) and bool(torch.isfinite(res[2]).all()) and all(
        bool(torch.isfinite(s).all()) for s in res[0].values())


# ----------------------------------------------------------------------------------------------------------------


def step_trials(
    model: nn.Module,
    x: Tensor | Batch,
    y: Tensor | None,
    indices: Tensor | np.ndarray,
    batch_size: int,
    lr: float,
    reduction: Reduction,
    selected: Sequence[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trials_per_block: int | None = None,
    engine: Engine = "auto",
    loss: PerExampleLoss | None = None,
) -> StepResult:
    """Run the step protocol for every row of ``indices`` and return the per-trial :class:`StepResult`.

    S = Σ_{k=1}^{N/m} ∇L_{B_k}(θ_k) with θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k), B_k = indices[t, (k−1)m : km]
    (blog "gradient competition"; SCIENCE.md "The two probe protocols").

    Args:
        model: the network at θ (not mutated; its parameters are copied to ``device``/``dtype``).
        x, y: the example pool (n, ...) and integer labels (n,), on any device; rows are gathered per block.  Or
            ``x`` a batch pytree of the whole pool (:mod:`gradlab.task`) and ``y`` None.
        indices: (T, N) integer indices into the pool, one row per trial (drawn by the caller from its seeds).
        batch_size: m, must divide N.
        lr: SGD learning rate η (plain SGD, no momentum or weight decay).
        reduction: ``"mean"`` or ``"sum"`` of the per-example losses over each minibatch.
        selected: parameter names (``model.named_parameters()``) whose S and step norms are recorded.
        dtype: compute dtype (float32 for production, float64 for reference checks).
        device: where to compute (``"cpu"``, ``"cuda"``).
        trials_per_block: trials advanced in lock-step; default 2 on CPU (cache-sized blocks for the blog MLP),
            32 on CUDA.  Results do not depend on it; peak memory is O(trials_per_block · parameters) plus the
            returned S arrays (O(T · selected)), so call per chunk of trials when selecting many parameters.
        engine: ``"auto"`` (chain when the model is a Linear/ReLU chain, else loop on CPU and generic elsewhere),
            ``"chain"``, ``"loop"``, ``"generic"``.  The chain engine needs the built-in cross-entropy on (x, y).
        loss: the per-example loss ``fn(model, batch) -> (B,)`` (:mod:`gradlab.task`); default cross-entropy.

    Raises:
        UsageError: bad arguments (see :func:`check_step_inputs`), active dropout, or ``engine="chain"`` on a model
            that is not a Linear/ReLU chain.
    """
    if loss is None or loss is task_cross_entropy:
        loss = task_cross_entropy
        if y is None and isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, Tensor) for t in x) \
                and x[1].ndim == 1 and not x[1].is_floating_point():
            x, y = x  # classification (x, y): the chain engine applies
    inp = check_step_inputs(model, x, y, indices, batch_size, lr, reduction, selected, dtype)
    dev = torch.device(device)
    if trials_per_block is None:
        trials_per_block = DEFAULT_TRIALS_PER_BLOCK.get(dev.type, 2)
    if isinstance(trials_per_block, np.integer):
        trials_per_block = int(trials_per_block)
    if not isinstance(trials_per_block, int) or trials_per_block < 1:
        raise UsageError(f"trials_per_block must be a positive integer, got {trials_per_block!r}")
    if engine not in ("auto", "chain", "loop", "generic"):
        raise UsageError(f"engine must be 'auto', 'chain', 'loop' or 'generic', got {engine!r}")
    ops = chain_ops(model) if (y is not None and loss is task_cross_entropy) else None
    if ops is not None and not _is_flat_chain(model) and x.ndim != 2:
        ops = None  # an nn.Sequential starting with Linear applies to the last axis only: not a flat chain
    if engine == "chain" and ops is None:
        raise UsageError(f"engine='chain' needs a chain of nn.Linear/nn.ReLU (gradlab MLP without batch norm) with "
                         f"the cross-entropy loss on (x, y); {type(model).__name__} is not one: use engine='auto'")
    use_chain = ops is not None and engine in ("auto", "chain")
    use_loop = not use_chain and (engine == "loop" or (engine == "auto" and dev.type == "cpu"))
    log.debug("step_trials: %s engine, %d trials, m=%d, blocks of %d",
              "chain" if use_chain else "loop" if use_loop else "generic", inp.indices.shape[0], batch_size,
              trials_per_block)

    theta = {n: p.detach().to(device=dev, dtype=dtype).clone() for n, p in model.named_parameters()}
    net = None
    if not use_chain:
        from torch.func import replace_all_batch_norm_modules_

        net = replace_all_batch_norm_modules_(copy.deepcopy(model).to(device=dev, dtype=dtype)).train()

    n_trials, n_budget = inp.indices.shape
    shapes = {n: tuple(theta[n].shape) for n in inp.selected}
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    grad_sum = {n: np.empty((n_trials, *shapes[n]), dtype=np_dtype) for n in inp.selected}
    displacement = np.empty(n_trials)
    step_norms = np.empty((n_trials, inp.n_steps))
    nonfinite = np.zeros(n_trials, dtype=np.int64)
    n_classes = None
    ws = _Workspace(theta, inp.selected, trials_per_block) if use_chain else None
    for start in range(0, n_trials, trials_per_block):
        rows = inp.indices[start:start + trials_per_block]
        tb = rows.shape[0]
        if ws is not None:
            xb = ws.gather(x, rows, dtype, dev)
        elif y is not None:
            xb = x[rows.reshape(-1)].to(device=dev, dtype=dtype).reshape(tb, n_budget, *x.shape[1:])
        else:  # a batch pytree: floating leaves to the compute dtype, integer leaves as they are
            flat = rows.reshape(-1)
            xb = tree_map(lambda t: to_run(t[flat.to(t.device)], device=dev, dtype=dtype).reshape(
                tb, n_budget, *t.shape[1:]) if isinstance(t, Tensor) else t, x)
        yb = y[rows.reshape(-1)].to(device=dev, dtype=torch.long).reshape(tb, n_budget) if y is not None else None
        with torch.no_grad():
            if use_chain:
                assert ops is not None
                xb = xb.reshape(tb, n_budget, -1)
                if n_classes is None:
                    last = next(op for op in reversed(ops) if op is not None)
                    n_classes = theta[last.weight].shape[0]
                onehot = F.one_hot(yb, n_classes).to(dtype)
                # a fused update can hide a non-finite gradient only if lr == 0; otherwise θ_end turns non-finite
                # and the block is rerun with exact counting (rare, so the common path skips the isfinite passes)
                assert ws is not None
                res = _chain_block(ops, theta, xb, onehot, inp, inp.lr == 0.0, ws)
                if inp.lr != 0.0 and not _all_finite(res):
                    res = _chain_block(ops, theta, xb, onehot, inp, True, ws)
            elif use_loop:
                assert net is not None
                res = _loop_block(net, theta, xb, yb, inp, inp.lr == 0.0, loss)
                if inp.lr != 0.0 and not _all_finite(res):
                    res = _loop_block(net, theta, xb, yb, inp, True, loss)
            else:
                assert net is not None
                res = _generic_block(net, theta, xb, yb, inp, loss)
        sums, disp, norms, bad = res
        sl = slice(start, start + tb)
        for n in inp.selected:
            grad_sum[n][sl] = sums[n].cpu().numpy()
        displacement[sl] = disp.double().cpu().numpy()
        step_norms[sl] = norms.double().cpu().numpy()
        nonfinite[sl] = bad.cpu().numpy()
        del res, sums, xb, yb
    mean, std, mx = summarise_step_norms(step_norms)
    return StepResult(grad_sum, displacement, mean, std, mx, nonfinite)
