"""The loop engine: a block's trials one after another on one private copy, with ``torch.autograd.grad``.

Any model, the default on CPU for models that are not Linear/ReLU chains.  For each trial the copy's parameters are
reset to θ, then K = N/m steps θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k) are taken with ``torch._foreach`` updates and
S = Σ_k ∇L_{B_k}(θ_k) is accumulated over the selected tensors -- the blog's loop without its per-trial model copy,
optimizer object and per-step non-finite passes (counted only when a block's results turn out non-finite: the
caller then reruns it with ``count=True``).  On CPU, ``vmap`` over trials ran at 0.5-0.85x the blog's loop for conv
nets (cnn, resnet-8 on 32x32 inputs, ``benchmarks/bench_step_conv.py``), this loop at 1.04-1.15x, so trials are not
batched here.  (Blog: "gradient competition"; McCandlish et al. 2018.)
"""

from __future__ import annotations

from typing import final

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from gradlab.probe.step.base import BlockResult, EngineSetup, StepEngine, block_outputs, train_copy
from gradlab.probe.step.loss import minibatch_loss
from gradlab.task import Batch, tensor_leaves


@final
class LoopEngine(StepEngine):
    """Trial after trial with autograd on one private train-mode copy of the model (see the module doc)."""

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        self.net = train_copy(setup)

    def block(self, xb: Tensor | Batch, yb: Tensor | None, count: bool) -> BlockResult:
        """The block's trials one after another; xb (Tb, N, ...), yb (Tb, N) -- or xb a batch pytree of
        (Tb, N, ...) leaves and yb None.  With ``count`` non-finite gradient entries are counted."""
        theta, inp, loss = self.setup.theta, self.setup.inp, self.setup.loss
        batch = xb if yb is None else (xb, yb)
        tb, m, lr = next(iter(tensor_leaves(batch))).shape[0], inp.batch_size, inp.lr
        names = list(theta)
        own = dict(self.net.named_parameters())
        params = [own[n] for n in names]
        sel = [names.index(n) for n in inp.selected]
        like = tensor_leaves(theta)[0]
        sums, step_norms, bad = block_outputs(tb, theta, inp, like)
        disp_sq = torch.zeros(tb, dtype=like.dtype, device=like.device)
        for t in range(tb):
            for p, n in zip(params, names):
                p.requires_grad_(False).copy_(theta[n]).requires_grad_(True)
            acc = [sums[n][t] for n in inp.selected]
            for k in range(inp.n_steps):
                sl = slice(k * m, (k + 1) * m)
                with torch.enable_grad():
                    value = minibatch_loss(self.net, tree_map(lambda v: v[t, sl], batch), loss, inp.reduction)
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
