"""Performance pieces of the chain engine (:mod:`gradlab.probe.step.chain`): pending low-rank updates, input
windows of the first layer, and the buffers every block reuses.

Each changes only the order of the additions in θ_{k+1} = θ_k − η gₖᵀaₖ (a Linear weight's minibatch gradient is
gᵀa, g the output gradients (m, out), a the inputs (m, in)), never the sums themselves; the chain engine is tested
against the plain loop with these paths forced on (``tests/probe/test_step.py``).  Timings: PERF-NOTES.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LowRankUpdates:
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
            apply_updates(self.weight, self.grad_sum, self.ut[:, :self.r], self.vt[:, :self.r], self.lr)
            self.r = 0


def apply_updates(weight: Tensor, grad_sum: Tensor | None, gt: Tensor, at: Tensor, lr: float) -> None:
    """W ← W − η Σ gᵀa and S ← S + Σ gᵀa (if recorded) for r pending rows gt (Tb, r, out), at (Tb, r, in): one GEMM
    each."""
    u = gt.transpose(1, 2)
    weight.baddbmm_(u, at, alpha=-lr)
    if grad_sum is not None:
        grad_sum.baddbmm_(u, at)


class InputWindow:
    """The first Linear layer, whose inputs are the data and so known in advance, run a window of K = R/m steps at a
    time.

    At a window's start the pending updates are flushed into W (one GEMM, as in :class:`LowRankUpdates`), and two
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
            apply_updates(self.weight, self.grad_sum, self.ut[:, :self.r], self.xw[:, :self.r], self.lr)
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


def outer_sq_norm(g: Tensor, a: Tensor) -> Tensor:
    """‖gᵀa‖_F² per trial from the m×m Grams of g (Tb, m, out) and a (Tb, m, in)."""
    return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))


class Workspace:
    """Buffers that every block of one :func:`~gradlab.probe.step.step_trials` call reuses: per-trial weight copies,
    the selected tensors' S, and the gathered inputs, each for ``trials_per_block`` trials (a block uses the first
    Tb rows).

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


