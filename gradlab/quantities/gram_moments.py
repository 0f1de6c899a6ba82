"""T₁ = tr K and T₂ = 1ᵀK1 of a trial's per-example Gram matrix (frozen protocol).

With Kᵢⱼ = gᵢ·gⱼ over the trial's N examples, T₁ = Σᵢ ‖gᵢ‖² and T₂ = ‖Σᵢ gᵢ‖²; they are the additive inputs of
the unbiased estimates of ‖G‖² and tr Σ (McCandlish et al. 2018, App. A; :func:`gradlab.probe.frozen.
trial_moment_estimates`), which `gradlab analyze` reports instead of these raw sums.

>>> import torch
>>> g = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)   # two examples' gradients
>>> out = GramMoments().compute(TrialInputs((1, 2), "mean", 2, gram=g @ g.T))
>>> float(out["gram_trace"]), float(out["gram_sum"])   # 1 + 5, ‖(2, 2)‖²
(6.0, 8.0)
"""

from __future__ import annotations

import numpy as np

from gradlab.quantities.base import Output, TrialInputs, TrialQuantity

SQ_UNITS = "(loss / parameter unit)²"


class GramMoments(TrialQuantity):
    outputs = (
        Output("gram_trace", "sum of squared per-example gradient norms", SQ_UNITS, ("checkpoint", "trial")),
        Output("gram_sum", "squared norm of summed per-example gradients", SQ_UNITS, ("checkpoint", "trial")),
    )
    protocols = ("frozen",)
    report = False  # they enter the headline U-statistic estimates of ‖G‖², tr Σ and B_noise

    def compute(self, inputs: TrialInputs) -> dict[str, np.ndarray]:
        total = inputs.gram
        return {"gram_sum": np.asarray(float(total.sum())), "gram_trace": np.asarray(float(total.diagonal().sum()))}
