"""The monitor's checks: of its arguments (:func:`check_arguments`), and, once, at its first recorded step, of
how the user's loop computes the gradient:

- :meth:`gradlab.monitor.norms.PerExampleNorms.check_uses`: a parameter used outside its hooked module goes to
  the per-example fallback (its module's inputs and output gradients do not see the other uses).
- :func:`extra_loss_terms`: the backpropagated loss must be Σᵢ wᵢℓᵢ (``monitor.loss(batch)``, scaled as you
  like).  A penalty added to it (λ‖θ‖²), or ``.grad`` not zeroed before the step, puts other terms in ``.grad``:
  S₁ = ‖.grad‖² is then not the data gradient's, and no step is estimated (``missing`` 6).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradlab.errors import UsageError

ESTIMATORS = ("per-example", "two-batch")
ON_GAP = ("warn", "raise")


def _integer(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < low:
        raise UsageError(f"{name} must be an integer ≥ {low}, got {v!r}")


def _real(name: str, v: Any, low: float, high: float, closed_low: bool = True) -> None:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
    if not ok or not ((low <= float(v)) if closed_low else (low < float(v))) or not float(v) < high:
        raise UsageError(f"{name} must be a number in {'[' if closed_low else '('}{low:g}, {high:g}), got {v!r}")


def check_arguments(model: object, *, loss: Any, path: Any, optimizer: Any, every: Any, estimator: Any,
                    reduction: Any, ema_decay: Any, level: Any, pool_size: Any, chunk_steps: Any, resume: Any,
                    start_step: Any, config: Any, on_gap: Any = "warn") -> None:
    """NoiseMonitor's arguments, before anything is written (each a one-line UsageError naming the fix)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"NoiseMonitor needs a torch nn.Module, got {type(model).__name__}")
    if not (isinstance(loss, str) or callable(loss)):
        raise UsageError(f"loss must be a loss name (e.g. 'cross-entropy'), 'pkg.module:fn', or a callable "
                         f"fn(model, batch) returning the per-example losses; got {type(loss).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"path must be the store's path (a str or pathlib.Path), got {path!r}")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer must be the torch.optim.Optimizer that steps the model (or None, then "
                             f"call monitor.step() after each step), got {type(optimizer).__name__}")
        mine = {id(p) for p in model.parameters() if p.requires_grad}
        if mine and not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            raise UsageError("the optimizer steps none of the model's parameters (an optimizer of another model, "
                             "or of a copy?); pass the optimizer built on this model's parameters")
    _integer("every", every, 1)
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if reduction not in ("mean", "sum"):
        raise UsageError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _real("ema_decay", ema_decay, 0.0, 1.0)
    _real("level", level, 0.0, 1.0, closed_low=False)
    if pool_size is not None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, numbers.Integral) or int(pool_size) < 2:
            raise UsageError(f"pool_size must be the number of training examples (an integer ≥ 2) or None, got "
                             f"{pool_size!r}")
    _integer("chunk_steps", chunk_steps, 1)
    if not isinstance(resume, bool):
        raise UsageError(f"resume must be True or False, got {resume!r}")
    if resume and start_step is None:
        raise UsageError("resume=True needs start_step: the number of optimizer steps of the checkpoint you "
                         "restored (the store keeps the steps before it)")
    if start_step is not None:
        if not resume:
            raise UsageError(f"start_step={start_step!r} is used only with resume=True (to continue a store); "
                             "pass resume=True, or drop start_step")
        _integer("start_step", start_step, 0)
    if on_gap not in ON_GAP:
        raise UsageError(f"on_gap must be one of {ON_GAP} (what a resume does when the store ends before the "
                         f"checkpoint's step: record the gap and warn, or refuse), got {on_gap!r}")
    if config is not None:
        if not isinstance(config, Mapping):
            raise UsageError(f"config must be a dict of JSON values, got {type(config).__name__}")
        try:
            json.dumps(dict(config), allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"config must hold JSON values only (numbers, strings, lists, dicts) so that a "
                             f"resume can compare it: {exc}") from None


def refuse_managed(kwargs: Mapping[str, Any], callback: str, resumes: str) -> None:
    """A training-framework callback sets ``resume``, ``start_step`` and ``optimizer`` itself: refuse them."""
    given = sorted({"resume", "start_step", "optimizer"} & set(kwargs))
    if given:
        raise UsageError(f"{callback} sets {given} itself (resume and start_step from the trainer's global_step "
                         f"when {resumes} resumes, the optimizer from the trainer); remove "
                         f"{'it' if len(given) == 1 else 'them'}")
    if kwargs.get("estimator", "per-example") != "per-example":
        raise UsageError(f"{callback} measures per-example gradients (it runs monitor.observe on each recorded "
                         f"step's batch): estimator={kwargs['estimator']!r} needs the micro-batches of your own "
                         "backward passes (NoiseMonitor with monitor.loss() in your loop); remove estimator=")


def extra_loss_terms(params: dict[str, Tensor], sums: dict[str, Tensor]) -> list[str] | None:
    """The parameters whose ``.grad`` is not ``c · sums`` (Σᵢ wᵢgᵢ from the hooks) for one common factor c > 0,
    relative 1e-4 in float32 and below, 1e-9 in float64; None if no parameter could be judged (no gradient, or a
    non-finite step: a later step is checked).

    The common factor is what the user's loop may do to ``.grad`` between ``backward()`` and the optimizer step
    without changing its direction: ``clip_grad_norm_`` (c ≤ 1, the same for every tensor), a ``GradScaler``'s
    unscaling (c = 1/scale).  S₁ and the per-example norms are read in the backward itself (before such a change)
    and of the backpropagated loss, whose weights wᵢ carry any scale: the estimates are those of the loss
    unscaled.  A penalty added to the loss, or ``.grad`` not zeroed, is not a common factor and is found."""
    bad, judged = [], False
    ok: list[str] = []
    found: list[tuple[float, float, float]] = []  # (‖sum‖², c, tol) of the tensors whose .grad is parallel to the sum
    for name, g in sums.items():
        grad = params[name].grad if name in params else None
        if grad is None:
            continue
        tol = 1e-4 if grad.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        if g.dtype in (torch.float16, torch.bfloat16):  # autocast: the backward's products in half precision
            tol = 3e-2 if g.dtype == torch.bfloat16 else 4e-3
        gd = grad.detach().to(torch.float64).reshape(-1)
        s = g.detach().to(device=gd.device, dtype=torch.float64).reshape(-1)
        ss, ref = float(torch.dot(s, s)), float(gd.norm())
        if not (math.isfinite(ss) and math.isfinite(ref)):
            continue
        judged = True
        if ss == 0.0 or ref == 0.0:  # nothing to scale: .grad must be 0 too
            if not ref <= 1e-30 + tol * math.sqrt(ss):
                bad.append(name)
            continue
        c = float(torch.dot(gd, s)) / ss
        err = float((gd - c * s).norm())
        if not (c > 0 and err <= tol * ref + 1e-30):
            bad.append(name)
        else:
            found.append((ss, c, tol))
            ok.append(name)
    if found:  # one factor for all tensors (the largest of them, by norm, sets it)
        c0 = max(found)[1]
        bad += [name for (_, c, tol), name in zip(found, ok) if not abs(c - c0) <= 10 * tol * c0]
    return bad if judged else None


def extra_terms_note(bad: list[str]) -> str:
    return (f"the backpropagated loss has terms besides monitor.loss(batch) (.grad of {bad[:3]} differs from the "
            "sum of the per-example gradients times one common factor: a penalty such as λ‖θ‖² added to the loss, "
            ".grad not zeroed before the step, or .grad changed per element before the optimizer step, e.g. "
            "clip_grad_value_?): ‖.grad‖² is not the data gradient's, so no step is estimated (missing = 6); use the "
            "optimizer's weight_decay, or add the penalty's gradient to .grad directly, after backward()")
