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
# # Where do the weights go? (the blog, seed 004)
#
# The blog trained an MLP on MNIST over a grid of batch size × learning rate and measured how far the weights
# moved from their initialisation (weights and biases apart), next to test accuracy; it compared SGD with Adam
# (SGD stays near the initial radius, Adam ignores it) and found distance growing roughly like log t
# (Hoffer et al. 2017). Here the same measurements come from `gradlab train` run stores on the embedded
# digits. The stores are made by the commands in `analyses/README.md`; set `GRADLAB_STUDIES` to read others.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt

from gradlab.analysis.training import final_table, grid, log_t_fits
from gradlab.figures.training import plot_distance_vs_epoch, plot_grid
from gradlab.store import open_store

STUDIES = Path(os.environ.get("GRADLAB_STUDIES", "../studies"))
grid_ds = open_store(STUDIES / "weights_grid" / "train.zarr", kind="train")
optim_ds = open_store(STUDIES / "sgd_vs_adam" / "train.zarr", kind="train")

# %% [markdown]
# ## Batch size × learning rate: weight distance, bias distance, test accuracy

# %%
table = final_table(grid_ds)
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
plot_grid(grid(table, "dist_init_weight"), axes[0], "weight distance ‖W − W₀‖")
plot_grid(grid(table, "dist_init_bias"), axes[1], "bias distance ‖b − b₀‖")
plot_grid(grid(table, "test_acc"), axes[2], "test accuracy")
fig.tight_layout()

# %%
by_m = table.groupby("batch_size")[["dist_init_weight", "test_acc"]].mean()
by_lr = table.groupby("lr")[["dist_init_weight", "test_acc"]].mean()
small, large = by_m.index.min(), by_m.index.max()
print(f"Averaged over learning rates, batch size {small} moved the weights {by_m.dist_init_weight[small]:.3g} "
      f"from init and reached test accuracy {by_m.test_acc[small]:.3f}; batch size {large} moved "
      f"{by_m.dist_init_weight[large]:.3g} and reached {by_m.test_acc[large]:.3f}.")
print(f"Larger learning rates move further: {dict(by_lr.dist_init_weight.round(3))}.")
r = table[["dist_init_weight", "test_acc"]].corr(method="spearman").iloc[0, 1]
print(f"Spearman correlation between weight distance and test accuracy over the grid: {r:.2f}.")

# %% [markdown]
# ## Distance from init over epochs, with the a + b·ln t fit

# %%
fits = log_t_fits(grid_ds)
print(fits[["run", "b", "b_lo", "b_hi", "r2"]].to_string(index=False))
fig, ax = plt.subplots(figsize=(7, 4))
plot_distance_vs_epoch(grid_ds, ax)
print(f"Median R² of the log t law over runs: {fits.r2.median():.3f}.")

# %% [markdown]
# ## SGD vs Adam: distance from init and from the origin

# %%
opt = final_table(optim_ds)
print(opt[["optimizer", "lr", "batch_size", "dist_init_all", "dist_origin_all", "test_acc"]].to_string(index=False))
init_radius = float(optim_ds.dist_origin.sel(epoch=0, group="all").isel(run=0))
for name, sub in opt.groupby("optimizer"):
    print(f"{name}: distance from init {sub.dist_init_all.mean():.3g}, distance from origin "
          f"{sub.dist_origin_all.mean():.3g} (initial radius {init_radius:.3g}).")

# %% [markdown]
# ## Cosine to the initial weights per layer, at the end of training

# %%
cos = optim_ds.cos_init_layer.isel(epoch=-1)
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, run in enumerate(optim_ds.run.values):
    ax.plot(range(optim_ds.sizes["layer"]), cos.isel(run=i).values, marker="o", label=str(run))
ax.set_xticks(range(optim_ds.sizes["layer"]), [str(v) for v in optim_ds.layer.values], rotation=45, ha="right")
ax.set_ylabel(f"{cos.attrs['long_name']}")
ax.legend(fontsize="x-small")
fig.tight_layout()

# %% [markdown]
# ## What the digits data shows, and where it differs from the blog
#
# The printed lines above are this run's findings. On the full digits study (`analyses/make_studies.sh`, MLP
# 2×1024, 30 epochs) they read: averaged over learning rates, batch size 16 moved the weights 8.15 from init and
# reached 96.6% test accuracy, batch size 256 moved 3.51 and reached 84.6%; larger learning rates move further
# (3.2, 6.0, 8.3 at η = 0.01, 0.05, 0.2), and over the grid weight distance and test accuracy go together
# (Spearman ρ = 0.90) -- the blog's "large batches stay closer to init and generalise worse at a fixed lr".
# The log t law fits well (median R² 0.987), least well for the slowest runs (η = 0.01 at batch 64 and 256,
# R² 0.83 and 0.84, and batch 256 at η = 0.05, R² 0.86). SGD stays on the sphere of the initial radius (26.3 →
# 26.5 from the origin on average while moving only 0.3–3.2 from init), Adam leaves it (52.5 from init on average,
# up to 82 at η = 0.01, 86 from the origin), as the blog found with 44 → 258 on MNIST.
#
# Where digits differs: with 1,438 training images an epoch at batch size 256 is only 6 steps, so the large-batch
# accuracy gap at a fixed number of epochs is partly a gap in the number of updates, which the blog could not
# separate either; the absolute distances are smaller than the blog's because the 8×8 inputs make the first
# layer 12× smaller (64 inputs against 784).
