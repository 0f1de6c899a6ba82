"""The generic engine: a block's trials in lock-step with ``torch.func`` over stacked per-trial parameters.

Any model, the default off CPU for models that are not Linear/ReLU chains.  The T_b trials' parameters are stacked
(T_b, *shape) and each step applies ``vmap(grad(L_B))`` through ``torch.func.functional_call`` on a private
train-mode copy, then θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k) for all trials at once; S = Σ_k ∇L_{B_k}(θ_k) over the
selected tensors.  Non-finite entries are always counted (the pass is cheap next to ``vmap(grad)``), so
``count_always`` is set.  (Blog: "gradient competition"; McCandlish et al. 2018.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from gradlab.probe.step.base import BlockResult, EngineSetup, StepEngine, block_outputs, train_copy
from gradlab.probe.step.loss import ReducedLoss
from gradlab.task import Batch, tensor_leaves


@final
class GenericEngine(StepEngine):
    """``vmap(grad)`` over stacked per-trial parameters of one private train-mode copy (see the module doc)."""

    count_always = True

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        self.net = train_copy(setup)

    def block(self, xb: Tensor | Batch, yb: Tensor | None, count: bool) -> BlockResult:
        """One block; xb (Tb, N, ...), yb (Tb, N) -- or xb a batch pytree of (Tb, N, ...) leaves and yb None.
        Non-finite entries are counted whatever ``count``."""
        from torch.func import functional_call, grad, vmap

        theta, inp = self.setup.theta, self.setup.inp
        batch = xb if yb is None else (xb, yb)
        like = tensor_leaves(theta)[0]
        tb, m, lr = next(iter(tensor_leaves(batch))).shape[0], inp.batch_size, inp.lr
        objective = ReducedLoss(self.net, self.setup.loss, inp.reduction)

        def loss_of(params: dict[str, Tensor], mb: Batch) -> Tensor:
            return functional_call(objective, {f"net.{n}": p for n, p in params.items()}, (mb,))

        grad_fn: Callable[..., dict[str, Tensor]] = vmap(grad(loss_of))
        params = {n: t.expand(tb, *t.shape).clone() for n, t in theta.items()}
        sums, step_norms, bad = block_outputs(tb, theta, inp, like)
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
