"""The monitor's checks: of its arguments (:func:`check_arguments`), and, once, at its first recorded step, of
how the user's loop computes the gradient:

- :meth:`gradlab.monitor.norms.PerExampleNorms.check_uses`: a parameter used outside its hooked module goes to
  the per-example fallback (its module's inputs and output gradients do not see the other uses).
- :func:`extra_loss_terms`: the backpropagated loss must be Σᵢ wᵢℓᵢ (``monitor.loss(batch)``, scaled as you
  like).  A penalty added to it (λ‖θ‖²), or ``.grad`` not zeroed before the step, puts other terms in ``.grad``:
  S₁ = ‖.grad‖² is then not the data gradient's, and no step is estimated (``missing`` 6).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradlab.errors import UsageError

ESTIMATORS = ("per-example", "two-batch")


def check_arguments(model: object, *, every: int, estimator: str, reduction: str, ema_decay: float,
                    pool_size: int | None, resume: bool, start_step: int | None) -> None:
    """NoiseMonitor's arguments, before anything is written (each a one-line UsageError)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"NoiseMonitor needs a torch nn.Module, got {type(model).__name__}")
    if int(every) < 1:
        raise UsageError(f"every must be ≥ 1 (record every K-th step), got {every}")
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if reduction not in ("mean", "sum"):
        raise UsageError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise UsageError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if pool_size is not None and int(pool_size) < 2:
        raise UsageError(f"pool_size must be the number of training examples (≥ 2), got {pool_size}")
    if resume and start_step is None:
        raise UsageError("resume=True needs start_step: the number of optimizer steps of the checkpoint you "
                         "restored (the store keeps the steps before it)")


def extra_loss_terms(params: dict[str, Tensor], sums: dict[str, Tensor]) -> list[str] | None:
    """The parameters whose ``.grad`` differs from ``sums`` (Σᵢ wᵢgᵢ from the hooks), relative 1e-4 in float32
    and below, 1e-9 in float64; None if no parameter could be judged (no gradient, or a non-finite step: a later
    step is checked)."""
    bad, judged = [], False
    for name, g in sums.items():
        grad = params[name].grad if name in params else None
        if grad is None:
            continue
        tol = 1e-4 if grad.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        err, ref = float((grad.detach() - g).norm()), float(grad.detach().norm())
        if not (math.isfinite(err) and math.isfinite(ref)):
            continue
        judged = True
        if not err <= tol * ref + 1e-30:
            bad.append(name)
    return bad if judged else None


def extra_terms_note(bad: list[str]) -> str:
    return (f"the backpropagated loss has terms besides monitor.loss(batch) (.grad of {bad[:3]} differs from the "
            "sum of the per-example gradients: a penalty such as λ‖θ‖² added to the loss, or .grad not zeroed "
            "before the step?): ‖.grad‖² is not the data gradient's, so no step is estimated (missing = 6); use the "
            "optimizer's weight_decay, or add the penalty's gradient to .grad directly, after backward()")
