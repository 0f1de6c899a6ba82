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
# # Sharp minima and batch size (Keskar et al. 2016, quoted in seed 001)
#
# Keskar et al. argued that large-batch SGD converges to sharp minimisers of the training loss, which generalise
# worse, and measured sharpness with their ε-sharpness (Metric 2.1) and a parametric plot along
# (1−α)·θ_small + α·θ_large. Jastrzębski et al. tie sharpness to η/m, and Cohen et al. show full-batch GD driving
# λ_max to about 2/η (the edge of stability). Here `gradlab sharpness` measured the late checkpoints of a grid of
# batch sizes on digits (λ_max by Lanczos, Hessian trace by Hutchinson, ε-sharpness by L-BFGS-B), and the
# interpolation between the smallest- and largest-batch solutions. Stores: `analyses/README.md`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt

from gradlab.analysis.curvature import analyze
from gradlab.figures.curvature import plot_interpolation, plot_minibatch_lambda, plot_sharpness_vs_batch_size
from gradlab.store import open_store

STUDIES = Path(os.environ.get("GRADLAB_STUDIES", "../studies"))
sharp = open_store(STUDIES / "keskar" / "sharpness.zarr", kind="sharpness")
ads, summary = analyze(sharp)

# %% [markdown]
# ## Sharpness vs training batch size

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
plot_sharpness_vs_batch_size(sharp, axes[0], measure="lambda_max", analysis=ads)
plot_sharpness_vs_batch_size(sharp, axes[1], measure="hessian_trace", analysis=ads)
plot_minibatch_lambda(sharp, axes[2], checkpoint=-1)
fig.tight_layout()
for c in summary["checkpoints"]:
    print(f"m = {c['train_batch_size']:g}, epoch {c['epoch']:g}: λ_max = {c['lambda_max']:.4g}, "
          f"λ_max·η/2 = {c['eos_ratio']:.3g}, generalisation gap = {c['generalization_gap']:.4g}")

# %%
def num(x):
    return "n/a" if x is None else f"{x:.3g}"


for r in summary["relations"]:
    if r["subset"] in ("all", "final") and r["x"] in ("train_batch_size", "lr_over_batch", "generalization_gap"):
        print(f"{r['measure']} vs {r['x']} ({r['subset']}, {r['n_points']} points): exponent {num(r['exponent'])} "
              f"[{num(r['exponent_low'])}, {num(r['exponent_high'])}], Spearman ρ = {num(r['spearman_rho'])}"
              + (f" — {r['note']}" if r.get("note") else ""))

# %% [markdown]
# ## Keskar's parametric plot: from the small-batch to the large-batch solution

# %%
fig, ax = plt.subplots(figsize=(7, 4))
plot_interpolation(sharp, ax)
i0 = int(abs(sharp.alpha - 0).argmin())
i1 = int(abs(sharp.alpha - 1).argmin())
print(f"train loss at α = 0 (small batch): {float(sharp.interp_train_loss[i0]):.4g}, at α = 1 (large batch): "
      f"{float(sharp.interp_train_loss[i1]):.4g}; max on [0, 1]: "
      f"{float(sharp.interp_train_loss.sel(alpha=slice(0, 1)).max()):.4g}")

# %% [markdown]
# ## What the digits data shows, and where it differs from Keskar et al.
#
# The printed lines above are the findings of this run; the paragraph below is written from the full study in
# `analyses/README.md` and is checked against it when the study is re-run.
