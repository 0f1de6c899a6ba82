"""Checks the monitor runs once, at its first recorded step, on how the user's loop computes the gradient.

- :meth:`gradlab.monitor.norms.PerExampleNorms.check_uses`: a parameter used outside its hooked module goes to
  the per-example fallback (its module's inputs and output gradients do not see the other uses).
- :func:`extra_loss_terms`: the backpropagated loss must be Σᵢ wᵢℓᵢ (``monitor.loss(batch)``, scaled as you
  like).  A penalty added to it (λ‖θ‖²), or ``.grad`` not zeroed before the step, puts other terms in ``.grad``:
  S₁ = ‖.grad‖² is then not the data gradient's, and no step is estimated (``missing`` 6).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
