"""Learning-rate rules: how η depends on the batch size m, and how it moves over training.

A rule is a frozen dataclass; ``lr_at(step, steps_per_epoch)`` is a pure function of the global step.

Scaling with batch size (``scaling``), from the base rate ``lr`` at batch size ``base_batch_size`` (m_base):

- ``constant``: η = lr.
- ``linear`` (Goyal et al. 2017): η = lr · m / m_base.
- ``sqrt`` (Hoffer et al. 2017): η = lr · √(m / m_base).
- ``sum`` (Masters & Luschi 2018, base learning rate η̃): the loss is the *sum* over the minibatch and η̃ = lr,
  so the update is η̃ · Σᵢ gᵢ, equivalent to mean reduction with η = η̃ · m.  ``reduction`` is then ``sum``.

Schedules on top (each optional, composable):

- gradual warmup (Goyal et al. 2017): over the first ``warmup_epochs`` the rate ramps linearly per step from
  ``lr`` (the unscaled base rate; for ``constant`` scaling from lr/10) to the scaled η;
- step decay: η is multiplied by ``decay_factor`` at each epoch in ``decay_epochs`` (e.g. 30, 60, 90 and 0.1);
- cyclic (Smith 2017, ``triangular2``; the VGG13 report, seed 003): η cycles between η/f and η·f with a period of
  ``2 · cyclic_half_epochs`` epochs, the amplitude halving each cycle.  With ``cyclic_sqrt_factor`` the factor
  shrinks with batch size: f = f_base · √(m_base / m) (the report's Equation 2), never below 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gradlab.errors import UsageError

SCALINGS = ("constant", "linear", "sqrt", "sum")


@dataclass(frozen=True)
class LRRule:
    lr: float
    batch_size: int
    scaling: str = "constant"
    base_batch_size: int = 32
    warmup_epochs: float = 0.0
    decay_epochs: tuple[int, ...] = field(default_factory=tuple)
    decay_factor: float = 0.1
    cyclic: bool = False
    cyclic_factor: float = 10.0
    cyclic_sqrt_factor: bool = False
    cyclic_half_epochs: float = 2.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"learning rate must be a positive number, got {self.lr}; pass e.g. --lr 0.01")
        if self.scaling not in SCALINGS:
            raise UsageError(f"unknown lr scaling {self.scaling!r}; choose one of {list(SCALINGS)}")
        if self.batch_size < 1 or self.base_batch_size < 1:
            raise UsageError(f"batch sizes must be >= 1 (got {self.batch_size}, base {self.base_batch_size})")
        if self.warmup_epochs < 0 or self.cyclic_half_epochs <= 0 or self.decay_factor <= 0 or self.cyclic_factor < 1:
            raise UsageError("warmup epochs must be >= 0, cyclic half-period and decay factor > 0, cyclic factor >= 1")

    @property
    def reduction(self) -> str:
        """``sum`` for the base-learning-rate rule, else ``mean``."""
        return "sum" if self.scaling == "sum" else "mean"

    def scaled_lr(self) -> float:
        """η after batch-size scaling, before any schedule."""
        m, m0 = self.batch_size, self.base_batch_size
        return {"constant": self.lr, "linear": self.lr * m / m0, "sqrt": self.lr * math.sqrt(m / m0),
                "sum": self.lr}[self.scaling]

    def factor(self) -> float:
        """The cyclic factor f (with the √-scaling of the VGG13 report when asked)."""
        f = self.cyclic_factor
        if self.cyclic_sqrt_factor:
            f = max(1.0, f * math.sqrt(self.base_batch_size / self.batch_size))
        return f

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """The learning rate used by optimizer step ``step`` (0-based) with ``steps_per_epoch`` steps per epoch."""
        epoch = step / steps_per_epoch
        eta = self.scaled_lr()
        for e in self.decay_epochs:
            if epoch >= e:
                eta *= self.decay_factor
        if self.cyclic:
            f = self.factor()
            half = self.cyclic_half_epochs
            cycle = math.floor(epoch / (2 * half))
            x = abs(epoch / half - 2 * cycle - 1)  # 1 at cycle start/end, 0 at the peak
            low, high = eta / f, eta * f
            eta = low + (high - low) * max(0.0, 1 - x) / (2**cycle)
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            start = self.lr / 10 if self.scaling == "constant" else self.lr
            frac = (step + 1) / (self.warmup_epochs * steps_per_epoch)
            eta = start + (eta - start) * min(1.0, frac)
        return eta

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["decay_epochs"] = list(self.decay_epochs)
        d["reduction"] = self.reduction
        d["scaled_lr"] = self.scaled_lr()
        return d
