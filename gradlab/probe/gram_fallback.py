"""Generic per-example Gram matrices: per-example gradients by ``torch.func.vmap(grad(...))``, then K = Γ Γᵀ.

Used for every selected tensor the layer identities of ``gradlab.probe.gram_layers`` cannot take (unknown layers,
a module called twice per forward, tied weights).  The per-example loss ``fn(model, batch) -> (B,)`` is wrapped in
a small ``nn.Module`` (:class:`_Task`) so that ``torch.func.functional_call`` can swap the fallback parameters, and
vmap maps over the batch pytree, each example re-batched with a leading dimension 1.  Memory: Γ is N × p for the
fallback tensors only; above ``max_bytes`` K is assembled from blocks of rows, recomputing per-example gradients
block by block (more passes, bounded memory).  A loss whose Python code reads tensor values (``int(y.max())``,
``if bool(...)``) cannot run under vmap: then each example gets its own backward pass (same values, slower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradlab import task
from gradlab.task import index_batch, inputs_targets

from .gram_layers import sym_gram

SumLoss = Callable[[nn.Module, Any], Tensor]


def _ce(model: nn.Module, batch: Any) -> Tensor:
    x, y = inputs_targets(batch)
    return F.cross_entropy(task._output_tensor(model(x)), y, reduction="sum") / max(1, y[0].numel())


def _mse(model: nn.Module, batch: Any) -> Tensor:
    x, y = inputs_targets(batch)
    return (task._output_tensor(model(x)) - y).pow(2).sum() / max(1, y[0].numel())


def _lm(model: nn.Module, batch: Any) -> Tensor:
    ids, labels = inputs_targets(batch)
    keep = labels != -100
    out = task._output_tensor(model(ids))
    tok = F.cross_entropy(out.transpose(1, 2), labels.masked_fill(~keep, 0), reduction="none")
    return ((tok * keep).sum(1) / keep.sum(1).to(tok.dtype)).sum()


# the built-in losses validate their inputs with Python reads of tensor values, which vmap cannot trace: on one
# example (a batch of 1, already validated by the engine's batched pass) these give the same ℓᵢ without checks
VMAP_SAFE: dict[Any, SumLoss] = {task.cross_entropy: _ce, task.mse: _mse, task.lm: _lm}


class _Task(nn.Module):
    """The model and a summed loss as one module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, total: SumLoss) -> None:
        super().__init__()
        self.model = model
        self.total = total

    def forward(self, batch: Any) -> Tensor:
        return self.total(self.model, batch)


def fallback_grams(model: nn.Module, total: SumLoss, batch: Any, n_ex: int, names: tuple[str, ...], *,
                   chunk_size: int, max_bytes: int, use_vmap: bool = True
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor], bool]:
    """(K, Σᵢ gᵢ) per tensor in ``names``, from per-example gradients of ``total`` (a summed loss) on ``batch``,
    and whether vmap could trace the loss (False: one backward pass per example; pass it back next time)."""
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    free = {n: params[n].detach() for n in names}
    wrapper = _Task(model, total)
    leaves, spec = tree_flatten(batch)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    def loss_one(free: dict[str, Tensor], *tensors: Tensor) -> Tensor:
        rows = list(leaves)
        for i, t in zip(where, tensors):
            rows[i] = t.unsqueeze(0)
        return functional_call(wrapper, {f"model.{n}": v for n, v in free.items()}, (tree_unflatten(rows, spec),))

    per_example = vmap(grad(loss_one), in_dims=(None,) + (0,) * len(where))
    dtype, device = next(iter(free.values())).dtype, next(iter(free.values())).device

    def loop(start: int, stop: int) -> dict[str, Tensor]:
        """One backward pass per example (for losses vmap cannot trace)."""
        out: dict[str, list[Tensor]] = {n: [] for n in names}
        ps = [params[n] for n in names]
        flags = [p.requires_grad for p in ps]
        try:
            for p in ps:
                p.requires_grad_(True)
            for i in range(start, stop):
                with torch.enable_grad():
                    g = torch.autograd.grad(total(model, index_batch(batch, slice(i, i + 1))), ps, allow_unused=True)
                for n, p, gi in zip(names, ps, g):
                    out[n].append(torch.zeros_like(p) if gi is None else gi)
        finally:
            for p, f in zip(ps, flags):
                p.requires_grad_(f)
        return {n: torch.stack(v) for n, v in out.items()}

    def block_rows(i0: int, i1: int) -> dict[str, Tensor]:
        """Per-example gradients Γ[i0:i1] of every fallback tensor, (i1 − i0, numel) each."""
        nonlocal use_vmap
        rows = {n: torch.empty((i1 - i0, free[n].numel()), dtype=dtype, device=device) for n in names}
        for start in range(i0, i1, chunk_size):
            stop = min(start + chunk_size, i1)
            g = None
            if use_vmap:
                try:
                    g = per_example(free, *(leaves[i][start:stop] for i in where))
                except RuntimeError as err:  # data-dependent Python control flow in the loss or the model
                    if "vmap" not in str(err) and "item" not in str(err):
                        raise
                    use_vmap = False
            if g is None:
                g = loop(start, stop)
            for n in names:
                rows[n][start - i0:stop - i0] = g[n].reshape(stop - start, -1)
        return rows

    row_bytes = sum(free[n].numel() for n in names) * free[names[0]].element_size()
    block = n_ex if n_ex * row_bytes <= max_bytes else max(1, max_bytes // (2 * row_bytes))
    k = {n: torch.empty((n_ex, n_ex), dtype=dtype, device=device) for n in names}
    total_grad = {n: torch.zeros(free[n].numel(), dtype=dtype, device=device) for n in names}
    starts = list(range(0, n_ex, block))
    for b, i0 in enumerate(starts):
        i1 = min(i0 + block, n_ex)
        gi = block_rows(i0, i1)
        for n in names:
            k[n][i0:i1, i0:i1] = sym_gram(gi[n])
            total_grad[n] += gi[n].sum(0)
        for j0 in starts[b + 1:]:
            j1 = min(j0 + block, n_ex)
            gj = block_rows(j0, j1)
            for n in names:
                torch.mm(gj[n], gi[n].T, out=k[n][j0:j1, i0:i1])
                k[n][i0:i1, j0:j1] = k[n][j0:j1, i0:i1].T
    return ({n: k[n].double() for n in names},
            {n: total_grad[n].reshape(free[n].shape) for n in names}, use_vmap)
