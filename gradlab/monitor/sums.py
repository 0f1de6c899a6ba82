"""What one step of the monitor collects, and its additive sums S₁ and Q per parameter tensor (torch side).

A step is one or more ``loss()`` calls (micro-batches) before the optimizer step.  Each backward pass leaves, per
parameter tensor, the squared norm of its ``.grad`` (S₁ times w², from a post-accumulate-grad hook) and either the
per-example ‖wᵢgᵢ‖² (:mod:`gradlab.monitor.norms`) or, for the two-batch estimator, the micro-batch's ‖Σ wᵢgᵢ‖²;
w = ∂L/∂ℓᵢ is the weight the backpropagated loss gave each example (1/B for a mean, 1 for a sum).
:func:`step_sums` turns them into S₁ and Q (:mod:`gradlab.monitor.estimators`) as float64 vectors over the
tensors, in a handful of kernels and one host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: relative spread of the weights wᵢ above which the examples count as weighted unequally (missing code 3)
WEIGHT_RTOL = 1e-6


@dataclass(eq=False)
class Micro:
    """One loss() call of a step: its size, the weights wᵢ = ∂L/∂ℓᵢ of the backpropagated loss, its batch."""

    n: int
    batch: Any
    weights: list[Tensor] = field(default_factory=list)
    norms: dict[str, Tensor] = field(default_factory=dict)   # per-example: (n,) ‖wᵢgᵢ‖²; two-batch: ‖Σ wᵢgᵢ‖²
    unscaled: dict[str, Tensor] = field(default_factory=dict)  # fallback parameters: (n,) ‖gᵢ‖²
    loss: Tensor | float = 0.0  # Σᵢ ℓᵢ of this call (detached)
    calls: Any = None  # the module calls its forward captured (:meth:`PerExampleNorms.arm`)
    collected: bool = False
    job: Any = None  # the background worker's Future of ``norms`` (:mod:`gradlab.monitor.worker`)
    marks: list[Any] = field(default_factory=list)  # what that job reads, to check it was not edited meanwhile


@dataclass
class Pending:
    step: int
    record: bool
    batch_size: int = 0  # the examples whose loss was backpropagated (counted when the backward reaches them)
    micros: list[Micro] = field(default_factory=list)
    grad_sq: dict[str, Tensor] = field(default_factory=dict)  # ‖.grad‖² per tensor after the last backward
    observed_grads: dict[str, Tensor] = field(default_factory=dict)  # observe(): Σ of its batches' gradients
    lr: float = math.nan
    observed: bool = False
    grad_versions: dict[str, tuple[Any, int]] = field(default_factory=dict)  # .grad after this step's backward
    stale: list[str] = field(default_factory=list)  # tensors whose .grad held the last step's at this backward
    marks: dict[str, tuple[Any, int]] | None = None  # the .grad tensors before the step's first backward


def loss_sum(pend: Pending) -> Tensor | float:
    """Σᵢ ℓᵢ over the step's micro-batches, in their order."""
    total: Tensor | float = 0.0
    for m in pend.micros:
        total = total + m.loss
    return total


def step_sums(pend: Pending, names: list[str], estimator: str
              ) -> tuple[Tensor, Tensor, Tensor | None, int, int]:
    """S₁ and Q per tensor (float64 vectors), the per-example rows (tensors, n) whose non-finite entries the caller
    counts on the host (None for the two-batch estimator), the missing code, k.

    The arithmetic is the one of the per-tensor loop it replaced, operation for operation (the stores it writes
    are bitwise the same): S₁ = ‖.grad‖²/w², per example ‖wᵢgᵢ‖²/w² in the norms' dtype, then float64 sums.  The
    weights are checked on the host (the step's one synchronisation before its final copy; on CPU a view).
    """
    n_t = len(names)
    micros = pend.micros
    device = next(iter(pend.grad_sq.values())).device if pend.grad_sq else torch.device("cpu")
    nan = torch.full((n_t,), math.nan, dtype=torch.float64, device=device)
    if not micros or not pend.grad_sq or any(not m.weights for m in micros):
        return nan, nan.clone(), None, 5, 0
    w_all = torch.cat([w for m in micros for w in m.weights]).to(torch.float64)
    w_host = w_all.cpu().numpy()
    w0h = w_host[0]
    if not (np.isfinite(w_host).all() and w0h != 0 and np.abs(w_host - w0h).max() <= WEIGHT_RTOL * abs(w0h)):
        return nan, nan.clone(), None, 3, 0
    w0 = w_all[0]
    w2 = w0 * w0
    zero = torch.zeros((), dtype=torch.float64, device=device)
    s1 = torch.stack([pend.grad_sq[n] if n in pend.grad_sq else zero for n in names]).to(torch.float64) / w2
    if estimator == "per-example":
        mats = [_per_example_rows(m, names, w2, device) for m in micros]
        q = mats[0].sum(1)
        for mat in mats[1:]:
            q = q + mat.sum(1)
        mat = mats[0] if len(mats) == 1 else torch.cat(mats, 1)
        return s1, q, mat, 1 if pend.batch_size < 2 else 0, pend.batch_size
    if any(not m.norms for m in micros):  # two micro-batches' losses summed into one backward: not separable
        return nan, nan.clone(), None, 4, sum(1 for m in micros if m.norms)
    q = torch.zeros(n_t, dtype=torch.float64, device=device)
    for m in micros:
        col = torch.stack([m.norms[n].to(torch.float64) if n in m.norms else zero for n in names])
        present = torch.tensor([n in m.norms for n in names], device=device)
        q = q + torch.where(present, col / (w2 * m.n), zero)
    k = len(micros)
    return s1, q, None, 4 if k < 2 else (1 if pend.batch_size < 2 else 0), k


def _per_example_rows(m: Micro, names: list[str], w2: Tensor, device: Any) -> Tensor:
    """(tensors, n) float64: the hooked rows ‖wᵢgᵢ‖²/w² (divided in their own dtype, stacked per dtype: a few
    kernels, not a few per tensor), the fallback rows ‖gᵢ‖² as they are, zeros for tensors without a gradient."""
    mat = torch.zeros(len(names), m.n, dtype=torch.float64, device=device)
    groups: dict[tuple[bool, torch.dtype], list[int]] = {}
    for j, n in enumerate(names):
        v = m.norms.get(n)
        if v is not None:
            groups.setdefault((True, v.dtype), []).append(j)
        elif n in m.unscaled:
            groups.setdefault((False, m.unscaled[n].dtype), []).append(j)
    for (scaled, dtype), idx in groups.items():
        src = m.norms if scaled else m.unscaled
        block = torch.stack([src[names[j]] for j in idx])
        if scaled:
            block = block / w2.to(dtype)
        mat[idx] = block.to(torch.float64)
    return mat
