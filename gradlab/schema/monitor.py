"""The monitor store's variables (``gradlab.monitor``: dims step, group, layer; the store layer is
:mod:`gradlab.monitor.store`).  Pure numpy."""

from __future__ import annotations

from gradlab.store import VarSpec

SQ = "(loss / parameter unit)²"

#: codes of the ``missing`` variable: why a recorded step has no noise estimate
MISSING = {
    0: "estimated",
    1: "batch of 1 example: no variance estimate (needs ≥ 2 examples)",
    2: "non-finite per-example gradient or gradient: step flagged, not estimated",
    3: "examples weighted unequally in the backpropagated loss: not estimated",
    4: "one micro-batch: the two-batch estimator needs ≥ 2 micro-batches",
    5: "no backward pass reached the monitored parameters for this step",
    6: "the backpropagated loss has terms besides the per-example losses (e.g. a penalty): not estimated",
    7: "a layer input the background worker read was changed in place before the next step: not estimated",
}


def monitor_variables() -> list[VarSpec]:
    """Every variable of a monitor store (each per-part variable twice: dims (step, group) and (step, layer))."""
    s = ("step",)
    per_part = [
        ("gram_sum", "squared norm of the summed gradient S₁ = ‖Σᵢ gᵢ‖²", SQ),
        ("gram_trace", "Q = Σ_j ‖s_j‖²/b_j (per example: Σᵢ ‖gᵢ‖²)", SQ),
        ("grad_sq_norm", "unbiased estimate of ‖G‖² from this step's batch", SQ),
        ("trace_cov", "unbiased estimate of tr Σ from this step's batch", SQ),
        ("b_simple", "B_simple of one step", "examples"),
        ("grad_sq_norm_ema", "‖G‖², moving average", SQ),
        ("grad_sq_norm_ema_low", "‖G‖², moving average, interval low", SQ),
        ("grad_sq_norm_ema_high", "‖G‖², moving average, interval high", SQ),
        ("trace_cov_ema", "tr Σ, moving average", SQ),
        ("trace_cov_ema_low", "tr Σ, moving average, interval low", SQ),
        ("trace_cov_ema_high", "tr Σ, moving average, interval high", SQ),
        ("b_noise", "B_noise = EMA(tr Σ) / EMA(‖G‖²)", "examples"),
        ("b_noise_low", "B_noise, interval low", "examples"),
        ("b_noise_high", "B_noise, interval high", "examples"),
        ("update_norm", "update norm ‖θ_{t+1} − θ_t‖", "parameter unit"),
        ("dist_init", "distance from init ‖θ_{t+1} − θ₀‖", "parameter unit"),
    ]
    out = [
        VarSpec("examples_seen", s, "int64", "examples seen up to and including this step", "examples"),
        VarSpec("batch_size", s, "int64", "examples in this step's batch B", "examples"),
        VarSpec("n_groups", s, "int64", "groups k the estimator used (per example: k = B; two-batch: micro-batches)",
            "1"),
        VarSpec("loss", s, "float64", "mean per-example loss of this step's batch", "loss"),
        VarSpec("lr", s, "float64", "learning rate used by this step (optimizer param group 0)", "1"),
        VarSpec("n_eff", s, "float64", "effective number of recorded steps in the moving average", "steps"),
        VarSpec("nonfinite_count", s, "int64", "non-finite per-example or gradient squared norms in this step", "count"),
        VarSpec("missing", s, "int8", "why this step has no noise estimate (0: it has one)", "1",
                attrs={"flag_values": list(MISSING), "flag_meanings": " | ".join(MISSING.values())}),
        VarSpec("wall_time", s, "float64", "wall-clock time at the end of the step (Unix time)", "s"),
    ]
    for name, long_name, units in per_part:
        out.append(VarSpec(name, ("step", "group"), "float64", long_name, units))
        out.append(VarSpec(name + "_layer", ("step", "layer"), "float64", long_name + " (per tensor)", units))
    return out


