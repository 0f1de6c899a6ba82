"""Branches advanced in lock-step: T continuations of one checkpoint at one batch size m, as batched matmuls.

A *branch* starts at θ (a checkpoint), takes K = N/m optimizer steps on the consecutive minibatches of its own
example stream ``stream[t]`` (N examples), with its own learning rate ``lrs[t]``, and records the mean
per-example loss on a fixed training subset and on the held-out split after the steps in ``eval_steps``::

    θ_1 = θ,   g_k = ∇ (1/m) Σ_{i∈B_k} ℓᵢ(θ_k),   θ_{k+1} = update(θ_k, g_k; η_t),

with ``update`` PyTorch's SGD (momentum μ, dampening 0, weight decay λ: b_k = μ b_{k−1} + g_k + λθ_k,
θ_{k+1} = θ_k − η b_k, b_0 = 0) or Adam (β = (0.9, 0.999), ε = 1e-8, bias-corrected; weight decay added to g).
Optimizer state starts at zero: checkpoints carry weights only, so a branch restarts the momentum buffers.

Two engines compute the same numbers (``tests/cbs/test_engine.py`` compares them in float64):

- ``chain``: a chain of ``nn.Linear``/``nn.ReLU`` (gradlab's MLP without batch norm) with the cross-entropy loss.
  Per-branch weight copies (T, out, in), forward and a hand-written backward with ``baddbmm``/``bmm``, the
  optimizer update on all T branches at once (plain SGD fused into the weight-gradient GEMM, or at small m on wide
  weights deferred as pending low-rank factors; optimizer buffers allocated once), evaluation as one batched
  product over the shared eval inputs.  Branches run in blocks capped at ``BLOCK_BYTES`` of state.
  The probe's step engine (:mod:`gradlab.probe.step`) does the same for trials; the idea, not the code, is reused
  because branches need per-branch learning rates, optimizer state and loss curves.
- ``loop``: any model and any per-example loss: branch after branch on a private copy with ``torch.optim``,
  evaluated with :func:`gradlab.curvature.evaluate.evaluate` in eval mode.  This is also the "each branch its own
  training run" baseline of ``benchmarks/bench_cbs.py``.

A branch *diverges* when its evaluated training loss is non-finite or exceeds max(``diverge_factor`` × L(θ), L₀),
with L(θ) the loss at the checkpoint and L₀ the loss of the zero output (:func:`zero_output_loss`: the model's
outputs replaced by zeros on the same examples -- log C for cross-entropy over C classes, log V per token for
``lm``, the targets' mean square for ``mse``).  So a diverged branch is both ``diverge_factor`` times worse than
its checkpoint and worse than a network that predicts nothing: a checkpoint trained to a tiny loss (Adam to 0.02,
say) no longer flags a healthy branch that wanders to 0.2 (10× its loss, far below log 10 = 2.3), while a blow-up
(non-finite, or nats above chance) still is; for a checkpoint with L(θ) ≥ L₀/``diverge_factor`` (any early one)
the rule is the plain factor × L(θ).  Where L₀ cannot be computed (a custom loss that fails on zero outputs) the
rule is factor × L(θ) alone.  ``diverged_step`` records the first such eval step (−1: never).  Its later losses
are recorded as computed (non-finite values included); the estimators exclude it and say why.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.errors import UsageError

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class Recipe:
    """How branches step: the optimizer and its hyperparameters (learning rates are per branch)."""

    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class BranchCurves:
    """Loss curves of T branches: ``train_loss``/``test_loss`` (T, J) at the J eval steps, ``diverged_step`` (T,)."""

    train_loss: np.ndarray
    test_loss: np.ndarray
    diverged_step: np.ndarray


def eval_plan(eval_steps: Sequence[int], n_steps: int) -> list[int]:
    steps = [int(s) for s in eval_steps]
    if steps != sorted(steps) or (steps and (steps[0] < 0 or steps[-1] > n_steps)):
        raise UsageError(f"eval steps must be sorted within 0..{n_steps}, got {steps}")
    return steps


def _diverged(train: np.ndarray, eval_steps: Sequence[int], factor: float,
              reference: float | None = None) -> np.ndarray:
    """First eval step whose training loss is non-finite or above max(``factor`` × the loss at step 0,
    ``reference``) (−1: none); ``reference`` (L₀) None or non-finite: ``factor`` × the loss at step 0 alone."""
    limit = factor * np.abs(train[:, :1])
    if reference is not None and math.isfinite(reference):
        limit = np.fmax(limit, abs(float(reference)))  # fmax: a NaN start loss leaves L₀
    bad = ~np.isfinite(train) | (train > limit)
    first = np.where(bad.any(1), bad.argmax(1), -1)
    steps = np.asarray(eval_steps, dtype=np.int64)
    return np.where(first >= 0, steps[np.maximum(first, 0)], -1).astype(np.int64)


class _ZeroOutput(nn.Module):
    """``net`` whose output tensor is replaced by zeros of the same shape (the loss of "predicting nothing")."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        from gradlab.task import _output_tensor

        return torch.zeros_like(_output_tensor(self.net(*args, **kwargs)))


def zero_output_loss(model: nn.Module, loss: Any, batch: Any) -> float | None:
    """L₀: the mean per-example loss on ``batch`` when the model's outputs are zeros (cross-entropy: log C; lm: log V
    per token; mse: the targets' mean square) -- the loss of predicting nothing, the floor of the divergence
    limit.  None when the loss cannot be evaluated on zero outputs (a custom loss that needs more) or is not
    finite and positive."""
    from gradlab.curvature.evaluate import evaluate

    try:
        with torch.no_grad():
            value = float(evaluate(_ZeroOutput(model), batch, loss=loss, dtype=None, device=None,
                                   chunk_size=2048)[0])
    except Exception:  # noqa: BLE001 - a custom loss that does not accept a plain zero tensor: no floor
        return None
    return value if math.isfinite(value) and value > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# loop engine: every branch its own training run


def loop_branches(model: nn.Module, loss: Any, train_batch: Any, eval_train: Any, eval_test: Any,
                  stream: np.ndarray, lrs: Sequence[float], batch_size: int, eval_steps: Sequence[int],
                  recipe: Recipe, *, dtype: torch.dtype = torch.float32, diverge_factor: float = 10.0,
                  diverge_reference: float | None = None) -> BranchCurves:
    """Each branch as its own training run (``torch.optim`` on a private copy of ``model``); see module docs.
    ``diverge_reference``: L₀ (None: :func:`zero_output_loss` of ``model`` on ``eval_train``)."""
    from gradlab.probe.step.loss import minibatch_loss
    from gradlab.task import index_batch, to_run
    from gradlab.curvature.evaluate import evaluate

    m = int(batch_size)
    n_steps = stream.shape[1] // m
    steps = eval_plan(eval_steps, n_steps)
    ev_train, ev_test = to_run(eval_train, dtype=dtype), to_run(eval_test, dtype=dtype)
    pool = to_run(train_batch, dtype=dtype)
    T = stream.shape[0]
    tr, te = np.full((T, len(steps)), np.nan), np.full((T, len(steps)), np.nan)
    for t in range(T):
        net = copy.deepcopy(model).to(dtype=dtype)
        params = list(net.parameters())
        if recipe.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=float(lrs[t]), momentum=recipe.momentum,
                                                         weight_decay=recipe.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=float(lrs[t]), betas=ADAM_BETAS, eps=ADAM_EPS,
                                   weight_decay=recipe.weight_decay)
        idx = torch.as_tensor(stream[t], dtype=torch.long)
        j = 0
        for k in range(n_steps + 1):
            while j < len(steps) and steps[j] == k:
                tr[t, j] = evaluate(net, ev_train, loss=loss, dtype=None, device=None, chunk_size=2048)[0]
                te[t, j] = evaluate(net, ev_test, loss=loss, dtype=None, device=None, chunk_size=2048)[0]
                j += 1
            if k == n_steps or j == len(steps):
                break
            net.train()
            opt.zero_grad(set_to_none=True)
            value = minibatch_loss(net, index_batch(pool, idx[k * m:(k + 1) * m]), loss, "mean")
            value.backward()
            opt.step()
    if diverge_reference is None:
        diverge_reference = zero_output_loss(copy.deepcopy(model).to(dtype=dtype), loss, ev_train)
    return BranchCurves(tr, te, _diverged(tr, steps, diverge_factor, diverge_reference))


# ---------------------------------------------------------------------------------------------------------------
# chain engine: T branches of a Linear/ReLU chain in lock-step


class _Optim:
    """SGD with momentum / Adam over per-branch tensors (T, ...) with per-branch learning rates, as torch.optim
    computes them (same formulas; float64 results agree to rounding).  Every buffer is allocated once: a fresh
    (T, out, in) tensor per step costs a page fault per 4 KiB (PERF-NOTES.md), more than the arithmetic.  A weight
    gradient gᵀa is passed as its factors so that plain SGD fuses the update into the GEMM (W ← W − Σ (ηg)ᵀa) and
    SGD with momentum forms b ← μb + gᵀa in one GEMM; only weight decay and Adam materialise gᵀa (into a buffer)."""

    def __init__(self, params: list[Tensor], lrs: Tensor, recipe: Recipe) -> None:
        self.params, self.recipe, self.t = params, recipe, 0
        self.lr = [lrs.view(-1, *([1] * (p.ndim - 1))) for p in params]
        adam = recipe.optimizer == "adam"
        self.m = [torch.zeros_like(p) for p in params] if adam else []
        self.v = [torch.zeros_like(p) for p in params] if adam else []
        self.buf = [torch.zeros_like(p) for p in params] if (recipe.momentum and not adam) else []
        need_grad = adam or bool(recipe.weight_decay)
        self.grad = [torch.empty_like(p) for p in params] if need_grad else []
        self.scratch = [torch.empty_like(p) for p in params] if adam else []

    def begin_step(self) -> None:
        self.t += 1

    def update(self, i: int, grad: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None) -> None:
        """Step parameter i with its gradient ``grad``, or ``factors`` (gᵀ (T, out, m), a (T, m, in)) of gᵀa."""
        r, p, lr = self.recipe, self.params[i], self.lr[i]
        if grad is None and (self.grad or not factors):
            assert factors is not None
            grad = torch.bmm(*factors, out=self.grad[i])
        if grad is not None and r.weight_decay:  # grad is this optimizer's buffer or a fresh bias gradient
            grad.add_(p, alpha=r.weight_decay)
        if r.optimizer == "adam":
            assert grad is not None
            b1, b2 = ADAM_BETAS
            m, v, s = self.m[i], self.v[i], self.scratch[i]
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
            torch.sqrt(v, out=s)
            s.div_(math.sqrt(bc2)).add_(ADAM_EPS)
            torch.div(m, s, out=s)
            p.sub_(s.mul_(lr / bc1))
        elif r.momentum:
            buf = self.buf[i]
            beta = r.momentum if self.t > 1 else 0.0  # b_1 = g_1, as torch.optim.SGD
            if grad is None:
                assert factors is not None
                buf.baddbmm_(*factors, beta=beta)
            else:
                buf.mul_(beta).add_(grad)
            p.addcmul_(lr, buf, value=-1)
        elif grad is None:
            assert factors is not None
            gt, a = factors
            p.baddbmm_(gt * lr.view(-1, 1, 1), a, alpha=-1)
        else:
            p.addcmul_(lr, grad, value=-1)


def _chain_forward(ops: list[Any], w: dict[str, Tensor], x: Tensor, shared: bool,
                   lazy: dict[str, Any] | None = None) -> list[Tensor]:
    """Activations of every op; x (T, n, d) per branch, or (n, d) shared by all branches (``shared``); ``lazy``:
    weights with pending low-rank updates (:class:`gradlab.probe.step.chain_buffers.LowRankUpdates`) to add in."""
    acts = [x]
    for op in ops:
        h = acts[-1]
        if op is None:
            h = torch.relu(h)
        elif h.ndim == 2:  # the shared eval inputs: one (n, d) @ (T, d, out) product
            h = torch.matmul(h, w[op.weight].transpose(1, 2))
            if op.bias is not None:
                h = h + w[op.bias]
        elif op.bias is None:
            h = torch.bmm(h, w[op.weight].transpose(1, 2))
        else:
            h = torch.baddbmm(w[op.bias], h, w[op.weight].transpose(1, 2))
        if lazy and op is not None and op.weight in lazy:
            lazy[op.weight].forward_add(h, acts[-1])
        acts.append(h)
    return acts


def _chain_eval(ops: list[Any], w: dict[str, Tensor], x: Tensor, y: Tensor, chunk: int = 4096) -> np.ndarray:
    """Mean cross-entropy of every branch on (x, y), (T,) float64."""
    total = None
    for s in range(0, x.shape[0], chunk):
        z = _chain_forward(ops, w, x[s:s + chunk], True)[-1]  # (T, n, C)
        yy = y[s:s + chunk]
        lp = torch.log_softmax(z, dim=-1)
        part = -lp.gather(2, yy.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(2).sum(1)
        total = part if total is None else total + part
    assert total is not None
    return (total / x.shape[0]).double().cpu().numpy()


# bytes of per-branch state (weights + optimizer buffers) one lock-step block may hold: a memory cap, not a cache
# size (blog MLP, SGD with momentum, 8 branches at m = 8 on the 2-core CPU: blocks of 1, 2 and 8 branches ran within
# 10-25% of each other, 8 the fastest, in float64 and float32)
BLOCK_BYTES = 1 << 30


def branches_per_block(model: nn.Module, recipe: Recipe, dtype: torch.dtype, n: int) -> int:
    """How many branches advance together: as many as keep weights and optimizer state within BLOCK_BYTES."""
    copies = 1 + (2 if recipe.optimizer == "adam" else 1 if recipe.momentum else 0) + bool(recipe.weight_decay)
    per = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8 * copies
    return max(1, min(n, BLOCK_BYTES // max(per, 1)))


def chain_branches(model: nn.Module, x: Tensor, y: Tensor, eval_train: tuple[Tensor, Tensor],
                   eval_test: tuple[Tensor, Tensor], stream: np.ndarray, lrs: Sequence[float], batch_size: int,
                   eval_steps: Sequence[int], recipe: Recipe, *, dtype: torch.dtype = torch.float32,
                   diverge_factor: float = 10.0, diverge_reference: float | None = None,
                   block: int | None = None) -> BranchCurves:
    """All branches in lock-step, ``block`` at a time (default :func:`branches_per_block`; results do not depend
    on it); ``model`` must be a Linear/ReLU chain (:func:`chain_ops`).  ``diverge_reference``: L₀ (None:
    :func:`zero_output_loss`, here log C).  See the module docs."""
    from gradlab.probe.step.chain import chain_ops

    ops = chain_ops(model)
    if ops is None:
        raise UsageError(f"the chain engine needs a chain of nn.Linear/nn.ReLU, not {type(model).__name__}; "
                         "use engine='loop'")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:  # it would step them: the loop engine holds them fixed, as torch.optim does
        raise UsageError(f"the chain engine trains every parameter, but {', '.join(frozen)} has requires_grad=False; "
                         "use engine='loop' (it holds frozen parameters fixed)")
    T = stream.shape[0]
    block = block or branches_per_block(model, recipe, dtype, T)
    lrs = np.asarray(lrs, dtype=np.float64)
    parts = [_chain_block(ops, model, x, y, eval_train, eval_test, stream[s:s + block], lrs[s:s + block], batch_size,
                          eval_steps, recipe, dtype) for s in range(0, T, block)]
    tr = np.concatenate([p[0] for p in parts])
    te = np.concatenate([p[1] for p in parts])
    if diverge_reference is None:  # the chain's loss is the cross-entropy: zero logits give log C
        from gradlab.task import cross_entropy

        diverge_reference = zero_output_loss(copy.deepcopy(model).to(dtype=dtype), cross_entropy,
                                             (eval_train[0].to(dtype), eval_train[1]))
    return BranchCurves(tr, te, _diverged(tr, eval_plan(eval_steps, stream.shape[1] // int(batch_size)),
                                          diverge_factor, diverge_reference))


def _chain_block(ops: list[Any], model: nn.Module, x: Tensor, y: Tensor, eval_train: tuple[Tensor, Tensor],
                 eval_test: tuple[Tensor, Tensor], stream: np.ndarray, lrs: np.ndarray, batch_size: int,
                 eval_steps: Sequence[int], recipe: Recipe, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    m, T = int(batch_size), stream.shape[0]
    n_steps = stream.shape[1] // m
    steps = eval_plan(eval_steps, n_steps)
    flat = lambda t: t.reshape(t.shape[0], -1).to(dtype)  # noqa: E731
    x, ex, tx = flat(x), flat(eval_train[0]), flat(eval_test[0])
    ey, ty = eval_train[1].long(), eval_test[1].long()
    theta = dict(model.named_parameters())
    w = {n: (p.detach().to(dtype).unsqueeze(0) if p.ndim == 2 else p.detach().to(dtype).view(1, 1, -1))
         .repeat(T, 1, 1) for n, p in theta.items()}
    names = list(w)
    pos = {n: i for i, n in enumerate(names)}
    opt = _Optim([w[n] for n in names], torch.as_tensor(lrs).to(dtype), recipe)
    n_classes = w[next(op for op in reversed(ops) if op is not None).weight].shape[1]
    idx = torch.as_tensor(stream, dtype=torch.long)
    tr, te = np.full((T, len(steps)), np.nan), np.full((T, len(steps)), np.nan)
    lazy = _lazy_weights(ops, w, m, recipe)
    lr_rows = opt.lr[0].view(-1, 1, 1)
    j = 0
    with torch.no_grad():
        for k in range(n_steps + 1):
            if j < len(steps) and steps[j] == k:
                for pending in lazy.values():
                    pending.flush()
            while j < len(steps) and steps[j] == k:
                tr[:, j], te[:, j] = _chain_eval(ops, w, ex, ey), _chain_eval(ops, w, tx, ty)
                j += 1
            if k == n_steps or j == len(steps):
                break
            rows = idx[:, k * m:(k + 1) * m]
            acts = _chain_forward(ops, w, x[rows.reshape(-1)].view(T, m, -1), False, lazy)
            g = torch.softmax(acts[-1], dim=-1).sub_(F.one_hot(y[rows], n_classes).to(dtype)).mul_(1.0 / m)
            opt.begin_step()
            for i in range(len(ops) - 1, -1, -1):
                op = ops[i]
                if op is None:
                    g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0)
                    continue
                g_in = torch.bmm(g, w[op.weight]) if i else None  # before the update: uses θ_k
                if op.weight in lazy:
                    if g_in is not None:
                        lazy[op.weight].backward_add(g_in, g)
                    lazy[op.weight].push(g * lr_rows, acts[i])  # W ← W − (ηg)ᵀa, deferred
                else:
                    opt.update(pos[op.weight], factors=(g.transpose(1, 2), acts[i]))
                if op.bias is not None:
                    opt.update(pos[op.bias], grad=g.sum(1, keepdim=True))
                g = g_in
    return tr, te


def _lazy_weights(ops: list[Any], w: dict[str, Tensor], m: int, recipe: Recipe) -> dict[str, Any]:
    """Plain SGD (no momentum, no weight decay) at small m on large weights: pending low-rank updates, flushed into W
    every R/m steps and before every evaluation (the probe's rule and rank: a rank-m update rewrites the whole
    (out, in) matrix every step, which at small m costs more memory traffic than the products)."""
    from gradlab.probe.step.chain import LOW_RANK
    from gradlab.probe.step.chain_buffers import LowRankUpdates

    if recipe.optimizer != "sgd" or recipe.momentum or recipe.weight_decay or 8 * m > LOW_RANK:
        return {}
    return {op.weight: LowRankUpdates(w[op.weight], LOW_RANK, 1.0) for op in ops
            if op is not None and min(w[op.weight].shape[1:]) > 2 * LOW_RANK}


def supports_chain(model: nn.Module, loss_name: str, x: Any) -> bool:
    """Whether :func:`chain_branches` applies: a Linear/ReLU chain whose parameters all train (the chain engine
    steps every weight and bias; a frozen one is held fixed by the loop engine, as by torch.optim), the
    cross-entropy loss, tensor inputs."""
    from gradlab.probe.step.chain import _is_flat_chain, chain_ops

    return (loss_name == "cross-entropy" and isinstance(x, Tensor) and chain_ops(model) is not None
            and all(p.requires_grad for p in model.parameters()) and (x.ndim == 2 or _is_flat_chain(model)))
