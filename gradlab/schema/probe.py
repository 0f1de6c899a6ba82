"""The probe store's schema: dims, variable names, long names and units (one vocabulary for store, CLI and plots).

Pure numpy: the analysis side imports this without torch.  A probe store (``gradlab_store = "probe"``) has dims

- ``checkpoint`` (str labels such as ``early``/``late``; coords ``checkpoint_path``, ``checkpoint_epoch``),
- ``batch_size`` (int m), ``trial`` (int), ``layer`` (one entry per parameter tensor, e.g. ``net.0.weight``;
  coord ``param_kind`` = ``weight``/``bias``; coord ``layer_size`` = number of entries),
- ``group`` (``all``, ``weight``, ``bias``: overall norms with weights and biases apart),
- ``example`` (0..N-1, the position inside a trial's draw), ``minibatch`` (0..N-1, padded with NaN: only the
  first N/m entries exist for batch size m), ``bin`` (tail-histogram bins, coords ``bin_lower``/``bin_upper``),
- ``vector_element`` (only with ``keep = vectors``: the flattened selected parameters).

Variables (dims in brackets; ``S`` is the sum of the minibatch gradients a trial used):

=====================  ==========================================  ===========================================
name                   dims                                        meaning
=====================  ==========================================  ===========================================
grad_norm              checkpoint, batch_size, trial               ‖S‖ over the selected parameters
grad_norm_group        checkpoint, batch_size, trial, group        ‖S‖ over all / weights / biases
grad_norm_layer        checkpoint, batch_size, trial, layer        ‖S‖ per parameter tensor
entry_hist             checkpoint, batch_size, trial, bin          counts of the entries of S (additive)
nonfinite_count        checkpoint, batch_size, trial               non-finite entries met in the trial
example_index          checkpoint, trial, example                  training-set indices of the trial's draw
done                   checkpoint, trial                           unit finished
step protocol only:
displacement           checkpoint, batch_size, trial               ‖θ_end − θ‖
step_grad_norm_mean    checkpoint, batch_size, trial               mean over steps of ‖∇L_{B_k}(θ_k)‖
step_grad_norm_std     checkpoint, batch_size, trial               std over steps of the same
step_grad_norm_max     checkpoint, batch_size, trial               max over steps of the same
frozen protocol only:
minibatch_grad_norm    checkpoint, batch_size, trial, minibatch    ‖∇L_B(θ)‖ of every minibatch of the partition
gram_trace             checkpoint, trial                           Σᵢ ‖gᵢ‖² over the trial's N examples (a quantity)
gram_sum               checkpoint, trial                           ‖Σᵢ gᵢ‖² over the trial's N examples (a quantity)
grad_sq_norm           checkpoint                                  estimate of ‖G‖² (unbiased, over trials)
trace_cov              checkpoint                                  estimate of tr Σ (unbiased, over trials)
grad_sq_norm_se        checkpoint                                  standard error of grad_sq_norm (s/√T)
trace_cov_se           checkpoint                                  standard error of trace_cov (s/√T)
b_noise                checkpoint                                  tr Σ / ‖G‖²
per checkpoint (both):
dist_init_layer        checkpoint, layer                           ‖θ − θ₀‖ per tensor
dist_origin_layer      checkpoint, layer                           ‖θ‖ per tensor
cos_init_layer         checkpoint, layer                           cos(θ, θ₀) per tensor
dist_init              checkpoint, group                           ‖θ − θ₀‖ over all / weights / biases
dist_origin            checkpoint, group                           ‖θ‖ over all / weights / biases
cos_init               checkpoint, group                           cos(θ, θ₀) over all / weights / biases
with keep = vectors:
grad_sum               checkpoint, batch_size, trial, vector_element  S itself for the selected parameters
=====================  ==========================================  ===========================================

Besides these, every registered per-trial quantity of the store's protocol (:data:`gradlab.quantities.QUANTITIES`)
adds its declared outputs (``gram_trace`` and ``gram_sum`` are the frozen protocol's).

Root attrs: ``gradlab_store``, ``schema_version``, ``config`` (JSON), ``config_hash``, ``provenance`` (JSON:
versions, git revision), ``protocol`` (``step``/``frozen``), ``reduction`` (``mean``/``sum``), ``budget`` (N),
``replacement`` (bool: draws with replacement), ``pool_size`` (n, the training-set size), ``seed``, ``lr``.
"""

from __future__ import annotations

import numpy as np

from gradlab.store import VarSpec

GROUPS = ("all", "weight", "bias")

# Tail-histogram bins: log-spaced magnitudes with sign, explicit zero, underflow and overflow; nothing clipped.
HIST_MIN_EXP = -12
HIST_MAX_EXP = 4
HIST_BINS_PER_DECADE = 8


def entry_bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edges of the fixed tail-histogram bins shared by every batch size and checkpoint.

    Bins, in order: overflow (-inf, -1e4), 128 negative log bins, negative underflow (-1e-12, 0), zero [0, 0],
    positive underflow (0, 1e-12), 128 positive log bins, overflow (1e4, inf).  A value equal to a log edge
    belongs to the bin whose lower magnitude it is.  Non-finite entries are counted in ``nonfinite_count``.
    """
    n = (HIST_MAX_EXP - HIST_MIN_EXP) * HIST_BINS_PER_DECADE
    mag = np.logspace(HIST_MIN_EXP, HIST_MAX_EXP, n + 1)
    lo_pos, hi_pos = mag[:-1], mag[1:]
    lower = np.concatenate([[-np.inf], -hi_pos[::-1], [-mag[0]], [0.0], [0.0], lo_pos, [mag[-1]]])
    upper = np.concatenate([[-mag[-1]], -lo_pos[::-1], [0.0], [0.0], [mag[0]], hi_pos, [np.inf]])
    return lower, upper


def entry_bin_index(values: np.ndarray) -> np.ndarray:
    """Bin index in :func:`entry_bin_edges` of each finite value (non-finite values give -1)."""
    v = np.asarray(values, dtype=np.float64)
    n = (HIST_MAX_EXP - HIST_MIN_EXP) * HIST_BINS_PER_DECADE
    out = np.full(v.shape, -1, dtype=np.int64)
    finite = np.isfinite(v)
    a = np.abs(np.where(finite, v, 1.0))
    with np.errstate(divide="ignore"):
        k = np.floor((np.log10(np.where(a > 0, a, 1.0)) - HIST_MIN_EXP) * HIST_BINS_PER_DECADE + 1e-9).astype(np.int64)
    pos_base = n + 4  # index of the first positive log bin
    zero = n + 2
    idx_pos = np.where(a < 10.0**HIST_MIN_EXP, zero + 1, np.where(k >= n, pos_base + n, pos_base + np.clip(k, 0, n - 1)))
    idx_neg = np.where(a < 10.0**HIST_MIN_EXP, zero - 1, np.where(k >= n, 0, n - np.clip(k, 0, n - 1)))
    idx = np.where(v > 0, idx_pos, np.where(v < 0, idx_neg, zero))
    out[finite] = idx[finite]
    return out


def entry_histogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of ``values`` on the fixed bins, and the number of non-finite values."""
    idx = entry_bin_index(values).ravel()
    lower, _ = entry_bin_edges()
    counts = np.bincount(idx[idx >= 0], minlength=lower.size)
    return counts, int((idx < 0).sum())


def probe_variables(protocol: str, keep_vectors: bool) -> list[VarSpec]:
    """The variables of a probe store for ``protocol`` (``step`` or ``frozen``)."""
    cbt = ("checkpoint", "batch_size", "trial")
    norm_units = "loss / parameter unit"
    out = [
        VarSpec("grad_norm", cbt, "float64", "norm of summed minibatch gradients ‖S‖", norm_units),
        VarSpec("grad_norm_group", (*cbt, "group"), "float64", "‖S‖ per parameter group", norm_units),
        VarSpec("grad_norm_layer", (*cbt, "layer"), "float64", "‖S‖ per parameter tensor", norm_units),
        VarSpec("entry_hist", (*cbt, "bin"), "int32", "count of entries of S per bin", "count"),
        VarSpec("nonfinite_count", cbt, "int64", "non-finite gradient entries", "count"),
        VarSpec("example_index", ("checkpoint", "trial", "example"), "int64", "training-set index of drawn example",
                "1", fill=-1),
    ]
    if protocol == "step":
        out += [
            VarSpec("displacement", cbt, "float64", "displacement ‖θ_end − θ‖", "parameter unit"),
            VarSpec("step_grad_norm_mean", cbt, "float64", "mean over steps of minibatch gradient norm", norm_units),
            VarSpec("step_grad_norm_std", cbt, "float64", "std over steps of minibatch gradient norm", norm_units),
            VarSpec("step_grad_norm_max", cbt, "float64", "max over steps of minibatch gradient norm", norm_units),
        ]
    elif protocol == "frozen":
        out += [
            VarSpec("minibatch_grad_norm", (*cbt, "minibatch"), "float64", "minibatch gradient norm ‖∇L_B(θ)‖",
                    norm_units),
            VarSpec("grad_sq_norm", ("checkpoint",), "float64",
                    "unbiased estimate of the pool's ‖G‖² (trial mean of U-statistics, not the drawn sample's ‖Ḡ‖²)",
                    "(loss / parameter unit)²"),
            VarSpec("trace_cov", ("checkpoint",), "float64",
                    "unbiased estimate of the pool's tr Σ (trial mean of U-statistics)", "(loss / parameter unit)²"),
            VarSpec("grad_sq_norm_se", ("checkpoint",), "float64", "standard error of the ‖G‖² estimate",
                    "(loss / parameter unit)²"),
            VarSpec("trace_cov_se", ("checkpoint",), "float64", "standard error of the tr Σ estimate",
                    "(loss / parameter unit)²"),
            VarSpec("b_noise", ("checkpoint",), "float64", "noise batch size B_noise = tr Σ / ‖G‖²", "examples"),
        ]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'step' or 'frozen'")
    out += [
        VarSpec("dist_init_layer", ("checkpoint", "layer"), "float64", "distance from init ‖θ − θ₀‖",
                "parameter unit"),
        VarSpec("dist_origin_layer", ("checkpoint", "layer"), "float64", "distance from origin ‖θ‖", "parameter unit"),
        VarSpec("cos_init_layer", ("checkpoint", "layer"), "float64", "cosine to init cos(θ, θ₀)", "1"),
        VarSpec("dist_init", ("checkpoint", "group"), "float64", "distance from init ‖θ − θ₀‖", "parameter unit"),
        VarSpec("dist_origin", ("checkpoint", "group"), "float64", "distance from origin ‖θ‖", "parameter unit"),
        VarSpec("cos_init", ("checkpoint", "group"), "float64", "cosine to init cos(θ, θ₀)", "1"),
    ]
    if keep_vectors:
        out.append(VarSpec("grad_sum", (*cbt, "vector_element"), "float32", "summed minibatch gradient S",
                           norm_units))
    return out + quantity_variables(protocol)


def quantity_variables(protocol: str) -> list[VarSpec]:
    """The variables of the registered per-trial quantities of ``protocol`` (:data:`gradlab.quantities.QUANTITIES`),
    from their output declarations."""
    from gradlab.quantities import quantities_for

    return [VarSpec(o.name, o.dims, o.dtype, o.long_name, o.units, attrs=dict(o.attrs))
            for q in quantities_for(protocol) for o in q.outputs]
