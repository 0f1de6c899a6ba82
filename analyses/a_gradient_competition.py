# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gradient competition (the blog, seed 004)
#
# The blog reset an MLP to its early (epoch 2) and late (epoch 30) checkpoints, stepped through N = 1024 examples
# at batch size m, summed the minibatch gradients it used, and repeated 1000 times. It found the norm of the sum
# growing like √m, larger batches more variable "for the same distance moved", and heavier tails of the gradient
# entries at large m. Here the same experiment comes from two `gradlab probe` stores on digits checkpoints:
# the **step** protocol (the blog's, last layer kept as vectors) and the **frozen** protocol (no steps: every
# minibatch gradient norm of every partition, from per-example Gram matrices), which measures the noise model
# E‖s_B‖² = m²‖G‖² + m·tr Σ directly. Stores: `analyses/README.md`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt

from gradlab.analysis.interval import format_estimate as fmt
from gradlab.analysis.run import analyze_store
from gradlab.figures import norms, tails
from gradlab.store import open_store

STUDIES = Path(os.environ.get("GRADLAB_STUDIES", "../studies"))
N_BOOT = int(os.environ.get("GRADLAB_N_BOOT", "999"))
step_path = STUDIES / "competition" / "step.zarr"
frozen_path = STUDIES / "competition" / "frozen.zarr"
step = analyze_store(step_path, out_dir=STUDIES / "competition" / "step-analysis", n_boot=N_BOOT, figures=False)
frozen = analyze_store(frozen_path, out_dir=STUDIES / "competition" / "frozen-analysis", n_boot=N_BOOT,
                       figures=False)
step_a = open_store(step_path, group="analysis")
frozen_a = open_store(frozen_path, group="analysis")


# %% [markdown]
# ## Norm of the summed gradient vs batch size (step protocol, the blog's figure)

# %%
fig, ax = plt.subplots(figsize=(6, 4))
norms.plot_norm_vs_batch_size(step_a, ax, norm="grad_norm")
for label, c in step["checkpoints"].items():
    print(f"{label}: ‖S‖ ∝ m^β with β = {fmt(c['power_law']['grad_norm']['beta'])} "
          f"(p for β = ½: {c['power_law']['grad_norm']['p_beta_half']})")

# %% [markdown]
# ## The noise model and the √m law (frozen protocol)
#
# ‖s_B‖ (the summed gradient of one minibatch) against m, with the weighted least-squares fit of the noise model
# and the power law; B_noise = tr Σ/‖G‖² is where the √m regime ends.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
norms.plot_norm_vs_batch_size(frozen_a, ax, norm="minibatch_sum_rms")
for label, c in frozen["checkpoints"].items():
    nm, pl = c["estimates"], c["power_law"]["minibatch_sum_rms"]  # headline: U-statistics (summary["headline"])
    print(f"{label}: ‖G‖² = {fmt(nm['grad_sq_norm'])}, tr Σ = {fmt(nm['trace_cov'])}, "
          f"B_noise = {fmt(nm['b_noise'])}; β = {fmt(pl['beta'])}; √m law (local slope consistent with ½) "
          f"{'up to m = ' + str(pl['sqrt_law_max_batch_size']) if pl['sqrt_law_max_batch_size'] else 'nowhere at this precision'}; "
          f"crossover m = {fmt(pl['crossover'])} (finite-population fit: estimates B_noise)")
for change in frozen["comparison"]:
    if change["quantity"] in ("b_noise", "grad_sq_norm", "trace_cov"):
        print(change["text"])

# %% [markdown]
# ## Variability "for the same distance moved": normalised std, and histograms of ‖S‖

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
norms.plot_normalised_std(step_a, axes[0])
labels = [str(c) for c in step_a.checkpoint.values]
for ax, label in zip(axes[1:], labels):
    norms.plot_norm_ridge(step_a, ax, label, normalised=True)
fig.tight_layout()
for label, c in step["checkpoints"].items():
    ms = sorted(c["statistics"], key=int)
    lo, hi = ms[0], ms[-1]
    print(f"{label}: normalised std of ‖S‖ is {c['statistics'][lo]['std_normalised']:.3g} at m = {lo} and "
          f"{c['statistics'][hi]['std_normalised']:.3g} at m = {hi}")

# %% [markdown]
# ## Tails of the gradient entries

# %%
fig, axes = plt.subplots(1, len(labels) + 1, figsize=(16, 4))
for ax, label in zip(axes, labels):
    tails.plot_entry_tails(step_a, ax, label)
tails.plot_tail_index(step_a, axes[-1])
fig.tight_layout()
for label, c in step["checkpoints"].items():
    ms = sorted(c["tails"], key=int)
    print(f"{label}: Hill tail index {fmt(c['tails'][ms[0]]['hill'])} at m = {ms[0]}, "
          f"{fmt(c['tails'][ms[-1]]['hill'])} at m = {ms[-1]}; α-stable index "
          f"{fmt(c['tails'][ms[0]]['alpha_stable'])} → {fmt(c['tails'][ms[-1]]['alpha_stable'])} (smaller = heavier)")

# %% [markdown]
# ## What the digits data shows, and where it differs from the blog
#
# The printed lines above are the findings of this run; the paragraph below is written from the full study in
# `analyses/README.md` and is checked against it when the study is re-run.
#
# On the full digits study (MLP 2×1024 trained at batch size 256, η = 0.05; 400 frozen and 100 step trials of
# N = 1024): at a fixed θ the noise model is an identity of sampling, so it is not "tested" (no lack-of-fit p).
# Early, ‖G‖² = 0.153 and tr Σ = 15.0, so B_noise = 98.3 [98.1, 98.5]; late, ‖G‖² halves (×0.51 [0.50, 0.51])
# and tr Σ doubles (×2.1 [2.1, 2.1]), so B_noise grows ×4.2 [4.2, 4.3] to 414 [410, 419] and ‖s_B‖ grows as
# m^0.539 [0.536, 0.542] over m = 1…1024 (m^0.635 [0.632, 0.638] early; β falls by 0.096 [0.092, 0.10]): late in
# training the summed gradient of a minibatch is noise-dominated almost up to the whole budget, which is the √m law.
# The local slope rises from 0.51 (m = 1→2) to 0.94 (512→1024) early and from 0.50 to 0.77 late. With 400 trials
# the slopes are measured so precisely that the exponent over m = 1…2 already differs from ½, so the "√m range"
# is empty at this precision. The crossover of the two-term fit is fitted in the finite-population form (draws
# without replacement), where it estimates B_noise: 98.3 [98.1, 98.6] early and 415 [410, 420] late; the earlier
# intercept form gave 106 early and 581 late, biased upward late, and is no longer reported.
#
# Where this differs from the blog: the blog's quantity, ‖S‖ of the step protocol with mean reduction, does not
# grow as √m here -- it falls as m^−0.92 [−0.93, −0.90] early and m^−0.80 [−0.81, −0.79] late, because each of the
# N/m steps carries the mean, i.e. 1/m of the summed gradient. The blog's rising √m curve is what ‖s_B‖ (sum
# reduction) does; we could not reproduce it with the step protocol as the blog describes it. Two other blog
# findings hold: late in training the normalised std of ‖S‖ grows with m (0.0034 at m = 1 to 0.0093 at m = 1024;
# nearly flat early, 0.0026 to 0.0033), and the entries of S are heavier-tailed at large m by the α-stable index
# (1.01 → 0.73 early, 1.07 → 0.63 late, m = 1 → 1024). The binned Hill index of the extreme tail does not agree: it
# rises with m late (6.7 [6.6, 6.8] → 10.2 [9.9, 10.5]) and early within overlapping intervals (9.3 → 11.8), so
# "heavier tails" depends on which part of the tail one measures; both estimators are in the store.
