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

Three engines compute the same numbers (tested against :func:`gradlab.probe.naive.naive_step_trials` in float64),
one per module, each a :class:`~gradlab.probe.step.base.StepEngine` whose ``block(xb, yb, count)`` advances a
block of trials in lock-step; :data:`ENGINES` maps the names to them:

- ``chain`` (:mod:`~gradlab.probe.step.chain`): chains of ``nn.Linear`` and ``nn.ReLU`` (gradlab's MLP without
  batch norm, or an ``nn.Sequential`` of Flatten/Linear/ReLU): per-trial weight copies, batched matmuls and a
  hand-written backward, with its performance pieces beside it (:mod:`~gradlab.probe.step.chain_buffers`).
- ``loop`` (:mod:`~gradlab.probe.step.loop`): any other model on CPU (the default there): trial after trial on one
  private copy with ``torch.autograd.grad``.
- ``generic`` (:mod:`~gradlab.probe.step.generic`): any other model on other devices (the default there), via
  ``torch.func.functional_call`` + ``vmap(grad)`` over stacked per-trial parameters.

The chain and loop engines count non-finite entries only when a block's results turn out non-finite (the block is
then rerun with ``count=True``); the generic engine always counts.

Model mode: the probe runs the model as SGD training does (train mode).  Batch-norm layers normalise each
minibatch with its own statistics; their running statistics are neither used nor updated (the loop and
generic engines work on a copy passed through ``torch.func.replace_all_batch_norm_modules_``).  Models with
active dropout are refused with :class:`~gradlab.errors.UsageError`: their randomness cannot be reproduced trial by
trial.  Parameters with ``requires_grad=False`` are held fixed, as training keeps them (no gradient, no step, not
selectable; such models run on the loop or generic engine).  The caller's model is never mutated.

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

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradlab.errors import UsageError
from gradlab.probe.step import chain
from gradlab.probe.step.base import (BlockResult, EngineSetup, Reduction, StepEngine, StepInputs, StepResult,
                                     all_finite, check_step_inputs, summarise_step_norms)
from gradlab.probe.step.chain import ChainEngine, chain_ops
from gradlab.probe.step.generic import GenericEngine
from gradlab.probe.step.loop import LoopEngine
from gradlab.probe.step.loss import minibatch_loss
from gradlab.task import Batch, PerExampleLoss
from gradlab.task import cross_entropy as task_cross_entropy

__all__ = ["DEFAULT_TRIALS_PER_BLOCK", "ENGINES", "Engine", "Reduction", "StepInputs", "StepResult",
           "check_step_inputs", "chain_ops", "minibatch_loss", "step_trials", "summarise_step_norms"]

log = logging.getLogger(__name__)

Engine = Literal["auto", "chain", "loop", "generic"]

DEFAULT_TRIALS_PER_BLOCK = {"cpu": 2, "cuda": 32}  # cpu: measured (PERF-NOTES); cuda: not measured yet

# the engines by name (``engine=`` of step_trials; "auto" picks one, see step_trials)
ENGINES: dict[str, type[StepEngine]] = {"chain": ChainEngine, "loop": LoopEngine, "generic": GenericEngine}


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
    on_block: Callable[[int], Any] | None = None,
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
        on_block: called with the number of trials of each block once it has finished (a progress bar).

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
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if set(frozen) & set(inp.selected):
        raise UsageError(f"selected parameters {[n for n in inp.selected if n in frozen]} are frozen "
                         "(requires_grad=False) and have no gradient in training; select trainable ones")
    dev = torch.device(device)
    if trials_per_block is None:
        trials_per_block = DEFAULT_TRIALS_PER_BLOCK.get(dev.type, 2)
    if isinstance(trials_per_block, np.integer):
        trials_per_block = int(trials_per_block)
    if not isinstance(trials_per_block, int) or trials_per_block < 1:
        raise UsageError(f"trials_per_block must be a positive integer, got {trials_per_block!r}")
    if engine != "auto" and engine not in ENGINES:
        raise UsageError(f"engine must be 'auto', 'chain', 'loop' or 'generic', got {engine!r}")
    fits_chain = chain.applies(model, x, y, loss) and not frozen
    if engine == "chain" and not fits_chain:
        raise UsageError(f"engine='chain' needs a chain of nn.Linear/nn.ReLU (gradlab MLP without batch norm) with "
                         f"the cross-entropy loss on (x, y); {type(model).__name__} is not one: use engine='auto'")
    if engine == "auto":
        engine = "chain" if fits_chain else "loop" if dev.type == "cpu" else "generic"
    log.debug("step_trials: %s engine, %d trials, m=%d, blocks of %d", engine, inp.indices.shape[0], batch_size,
              trials_per_block)

    theta = {n: p.detach().to(device=dev, dtype=dtype).clone() for n, p in model.named_parameters()
             if p.requires_grad}  # frozen parameters stay as the engines' private model copies hold them
    eng = ENGINES[engine](EngineSetup(model, theta, inp, loss, dtype, dev, trials_per_block))
    # a fused update (chain) or an uncounted step (loop) can hide a non-finite gradient only if lr == 0; otherwise
    # θ_end turns non-finite and the block is rerun with exact counting (rare, so the common path skips the passes)
    count = inp.lr == 0.0 or eng.count_always

    n_trials = inp.indices.shape[0]
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    grad_sum = {n: np.empty((n_trials, *theta[n].shape), dtype=np_dtype) for n in inp.selected}
    displacement = np.empty(n_trials)
    step_norms = np.empty((n_trials, inp.n_steps))
    nonfinite = np.zeros(n_trials, dtype=np.int64)
    for start in range(0, n_trials, trials_per_block):
        rows = inp.indices[start:start + trials_per_block]
        xb, yb = eng.gather(x, y, rows)
        with torch.no_grad():
            res: BlockResult = eng.block(xb, yb, count)
            if not count and not all_finite(res):
                res = eng.block(xb, yb, True)
        sums, disp, norms, bad = res
        sl = slice(start, start + rows.shape[0])
        for n in inp.selected:
            grad_sum[n][sl] = sums[n].cpu().numpy()
        displacement[sl] = disp.double().cpu().numpy()
        step_norms[sl] = norms.double().cpu().numpy()
        nonfinite[sl] = bad.cpu().numpy()
        del res, sums, xb, yb
        if on_block is not None:
            on_block(int(rows.shape[0]))
    mean, std, mx = summarise_step_norms(step_norms)
    return StepResult(grad_sum, displacement, mean, std, mx, nonfinite)
