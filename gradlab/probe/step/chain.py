"""The chain engine: models that are a chain of ``nn.Linear`` and ``nn.ReLU``, with batched matmuls and a hand-written
backward.

Accepted models: gradlab's MLP without batch norm, or an ``nn.Sequential`` of Flatten/Linear/ReLU (:func:`chain_ops`),
with the built-in cross-entropy on (x, y).  Each block of trials keeps per-trial weight copies (T_b, out, in), runs
forward and the backward dℓ/dz = softmax(z) − e_y, g_in = g W, ∇W = gᵀa with ``baddbmm``/``bmm``, and applies
θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k) in place.  For weights whose gradient is not recorded the update is fused into the
weight-gradient GEMM, or, at small m on large weights, kept as pending low-rank factors folded in with one GEMM
every R/m steps (:class:`~gradlab.probe.step.chain_buffers.LowRankUpdates`; the first layer runs in input windows,
:class:`~gradlab.probe.step.chain_buffers.InputWindow`): same sums in a different order.  No Python loop over
trials.  Blocks of 2 trials keep the per-trial weights in cache on a 2-core CPU (PERF-NOTES.md).  Non-finite
entries are only counted when a block's results turn out non-finite: the caller then reruns it with ``count=True``,
every gradient formed and counted.  (Blog: "gradient competition"; McCandlish et al. 2018.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.probe.step.base import (BlockResult, EngineSetup, StepEngine, StepInputs, block_outputs,
                                     gather_labels)
from gradlab.probe.step.chain_buffers import InputWindow, LowRankUpdates, Workspace, outer_sq_norm
from gradlab.task import Batch, PerExampleLoss
from gradlab.task import cross_entropy as task_cross_entropy


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


def applies(model: nn.Module, x: Tensor | Batch, y: Tensor | None, loss: PerExampleLoss) -> bool:
    """Whether the chain engine can run ``model`` on the pool (x, y) with ``loss``: a Linear/ReLU chain, the
    built-in cross-entropy on (x, y), and 2-D x unless the chain starts with ``nn.Flatten()`` (an ``nn.Sequential``
    starting with Linear applies to the last axis only: not a flat chain)."""
    if y is None or loss is not task_cross_entropy or chain_ops(model) is None:
        return False
    return _is_flat_chain(model) or x.ndim == 2


# pending-update rank R of LowRankUpdates; used for weights with min(out, in) > 2R when m <= R/8 (on the blog MLP,
# 2 threads: 1.6x faster at m = 4, 1.4x at m = 8, 1.3x slower at m = 16 than the fused GEMM update)
LOW_RANK = 64
# window of InputWindow in rows (K = WINDOW_RANK / m steps); used for a first Linear layer with min(out, in) >
# WINDOW_RANK when K >= 4 (blog MLP, 2 threads, 8 trials: 16% faster at m = 2, 13% at m = 4, 8% at m = 8, same at
# m = 16; windows of 128-512 rows were no better)
WINDOW_RANK = 64


@final
class ChainEngine(StepEngine):
    """Batched matmuls and a hand-written backward over per-trial weight copies (see the module doc)."""

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        ops = chain_ops(setup.model)
        if ops is None:
            raise ValueError(f"{type(setup.model).__name__} is not a Linear/ReLU chain (check chain.applies first)")
        self.ops = ops
        last = next(op for op in reversed(ops) if op is not None)
        self.n_classes = setup.theta[last.weight].shape[0]
        self.ws = Workspace(setup.theta, setup.inp.selected, setup.trials_per_block)

    def gather(self, x: Tensor | Batch, y: Tensor | None, rows: Tensor) -> tuple[Tensor | Batch, Tensor | None]:
        """x[rows] as (Tb, N, d_in) in the reused input buffer, y[rows] as (Tb, N)."""
        assert isinstance(x, Tensor)
        xb = self.ws.gather(x, rows, self.setup.dtype, self.setup.device)
        return xb.reshape(*rows.shape, -1), gather_labels(y, rows, self.setup.device)

    def block(self, xb: Tensor | Batch, yb: Tensor | None, count: bool) -> BlockResult:
        """One block; xb (Tb, N, d_in), yb (Tb, N).  S comes back as views of the workspace: copy them out before
        the next block."""
        assert isinstance(xb, Tensor) and yb is not None
        onehot = F.one_hot(yb, self.n_classes).to(self.setup.dtype)
        return chain_block(self.ops, self.setup.theta, xb, onehot, self.setup.inp, count, self.ws)


def chain_block(
    ops: list[_Op],
    theta: dict[str, Tensor],
    xb: Tensor,
    onehot: Tensor,
    inp: StepInputs,
    count: bool,
    ws: Workspace,
) -> BlockResult:
    """Run one block of trials; xb (Tb, N, d_in), onehot (Tb, N, C).  Returns S, displacement, step norms, counts
    (S as views of ``ws``: copy them out before the next block).

    With ``count`` every gradient is formed explicitly and its non-finite entries are counted; otherwise the
    updates of unrecorded weights are fused into a GEMM or kept as pending low-rank factors.
    """
    tb, m, lr = xb.shape[0], inp.batch_size, inp.lr
    # per-trial copies: weights (Tb, out, in), biases (Tb, 1, out) so that they broadcast in baddbmm
    base = {n: t.unsqueeze(0) if t.ndim == 2 else t.view(1, 1, -1) for n, t in theta.items()}
    w = {n: ws.weights[n][:tb].copy_(b.expand(tb, *b.shape[1:])) for n, b in base.items()}
    flat_sums, step_norms, bad = block_outputs(tb, theta, inp, xb, ws.sums)
    sums = {n: v.view(w[n].shape) for n, v in flat_sums.items()}  # views: biases as (Tb, 1, out)
    explicit = set(theta) if count else set(inp.selected)
    first_linear = next(i for i, op in enumerate(ops) if op is not None)
    op0 = ops[first_linear]
    assert op0 is not None
    window = None
    if not count and first_linear == 0 and 4 * m <= WINDOW_RANK and min(w[op0.weight].shape[1:]) > WINDOW_RANK:
        window = InputWindow(w[op0.weight], xb, m, WINDOW_RANK, lr, sums.get(op0.weight))
    lazy = {op.weight: LowRankUpdates(w[op.weight], LOW_RANK, lr, sums.get(op.weight)) for op in ops
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
                    sq.add_(outer_sq_norm(g, a_in))
            elif op.weight in lazy:
                lazy[op.weight].push(g, a_in)
                if op.weight in sums:
                    sq.add_(outer_sq_norm(g, a_in))
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


