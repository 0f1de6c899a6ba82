"""The blog's step-protocol loop, one trial at a time with ``torch.optim.SGD``: the reference for the fast engine.

For each trial: copy the model, then for k = 1..N/m: zero the gradients, forward minibatch B_k, cross-entropy with
the given reduction, backward, add the selected gradients into S, ``optimizer.step()``.  This computes

    S = Σ_k ∇L_{B_k}(θ_k),   θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k)

exactly as the blog's "gradient competition" code did.  It returns the same :class:`StepResult` as
:func:`gradlab.probe.step.step_trials`, with the same conventions (train mode, batch norm on minibatch statistics,
dropout refused, non-finite gradient entries counted over all parameters, every parameter stepped).  It is slow by
design (≈ 1.3 s per trial at m = 1 for the blog MLP, PERF-NOTES.md); use it to check, not to measure.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gradlab.probe.step import Reduction, StepResult, check_step_inputs, minibatch_loss, summarise_step_norms
from gradlab.task import Batch, PerExampleLoss, cross_entropy, index_batch, tensor_leaves, to_run


def naive_step_trials(
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
    count_nonfinite: bool = True,
    loss: PerExampleLoss | None = None,
) -> StepResult:
    """Step protocol by the obvious loop (arguments as in :func:`gradlab.probe.step.step_trials`).

    ``count_nonfinite=False`` skips the per-step pass over every gradient that counts non-finite entries, which
    costs several times the blog's loop itself at small m; ``nonfinite`` is then -1 (not counted).  Only timing
    comparisons with the blog's loop should use it.  ``loss``: the per-example loss (:mod:`gradlab.task`; default
    cross-entropy); with ``y`` None, ``x`` is a batch pytree of the whole pool.
    """
    loss = loss or cross_entropy
    inp = check_step_inputs(model, x, y, indices, batch_size, lr, reduction, selected, dtype)
    dev = torch.device(device)
    n_trials = inp.indices.shape[0]
    m = inp.batch_size
    grad_sum: dict[str, list[np.ndarray]] = {n: [] for n in inp.selected}
    displacement = np.empty(n_trials)
    step_norms = np.empty((n_trials, inp.n_steps))
    nonfinite = np.zeros(n_trials, dtype=np.int64) if count_nonfinite else np.full(n_trials, -1, dtype=np.int64)
    for t in range(n_trials):
        net = copy.deepcopy(model).to(device=dev, dtype=dtype).train()
        params = dict(net.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.SGD(list(params.values()), lr=inp.lr)
        sums = {n: torch.zeros_like(params[n]) for n in inp.selected}
        for k in range(inp.n_steps):
            rows = inp.indices[t, k * m:(k + 1) * m]
            opt.zero_grad()
            if y is not None:
                xb = x[rows].to(device=dev, dtype=dtype)
                yb = y[rows].to(device=dev, dtype=torch.long)
                value = minibatch_loss(net, (xb, yb), loss, inp.reduction)
            else:
                per = loss(net, to_run(index_batch(x, rows.to(tensor_leaves(x)[0].device)), device=dev, dtype=dtype))
                value = per.mean() if inp.reduction == "mean" else per.sum()
            value.backward()
            with torch.no_grad():
                sq = torch.zeros((), dtype=dtype, device=dev)
                for n, p in params.items():
                    if p.grad is None:  # parameter unused in forward: its gradient is zero
                        p.grad = torch.zeros_like(p)
                    if count_nonfinite:
                        nonfinite[t] += int((~torch.isfinite(p.grad)).sum())
                    if n in sums:
                        sums[n] += p.grad
                        sq += p.grad.square().sum()
                step_norms[t, k] = float(sq.sqrt())
            opt.step()
        with torch.no_grad():
            disp_sq = sum(float((params[n] - theta0[n]).square().sum()) for n in params)
        displacement[t] = np.sqrt(disp_sq)
        for n in inp.selected:
            grad_sum[n].append(sums[n].cpu().numpy())
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    out = {n: (np.stack(v) if v else np.empty((0, *_param_shape(model, n)))).astype(np_dtype, copy=False)
           for n, v in grad_sum.items()}
    mean, std, mx = summarise_step_norms(step_norms)
    return StepResult(out, displacement, mean, std, mx, nonfinite)


def _param_shape(model: nn.Module, name: str) -> tuple[int, ...]:
    """Shape of parameter ``name`` of ``model``."""
    return tuple(dict(model.named_parameters())[name].shape)
