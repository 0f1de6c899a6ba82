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
# # Large-batch remedies in small: the VGG13 report's Table I (seed 003)
#
# The report trained VGG13 on CIFAR-10 at batch sizes 32…1024 and stacked remedies: ghost batch norm (virtual
# batch 32) with the linear scaling rule, plus gradual warmup, cyclic learning rate (bounds η/f … η·f), and a cyclic
# factor shrinking with batch size, f = f_base·√(m_base/m). Its Table I shows the large-batch accuracy gap shrinking
# from 46.9 points to 1.3. Here a narrow VGG13 (`--model vgg --model-kwargs '{"width": 0.125}'`) on the embedded
# digits runs each remedy across batch sizes; one `gradlab train` store per remedy (see `analyses/README.md`).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from gradlab.analysis.training import final_table
from gradlab.figures.training import plot_grid
from gradlab.store import open_store

STUDIES = Path(os.environ.get("GRADLAB_STUDIES", "../studies"))
REMEDIES = {
    "baseline": "constant lr, plain batch norm",
    "ghostbn_linear": "ghost BN + linear scaling",
    "ghostbn_linear_warmup": "ghost BN + linear scaling + gradual warmup",
    "ghostbn_cyclic": "ghost BN + cyclic lr",
    "ghostbn_cyclic_sqrt": "ghost BN + cyclic lr + √-scaled factor",
}

# %%
rows = []
for key, label in REMEDIES.items():
    t = final_table(open_store(STUDIES / f"remedy_{key}" / "train.zarr", kind="train"))
    t["remedy"] = label
    rows.append(t)
results = pd.concat(rows, ignore_index=True)
table = results.pivot_table(values="test_acc", index="remedy", columns="batch_size", aggfunc="mean",
                            dropna=False).reindex(list(REMEDIES.values())) * 100
fig, ax = plt.subplots(figsize=(9, 3.5))
plot_grid(table, ax, "Table I in small: test accuracy [%]", fmt=".1f")
ax.set_ylabel("")
fig.tight_layout()
print(table.round(2).to_string())

# %%
trained = table.max(axis=1) > 20  # a remedy whose best batch size is near chance (10%) did not train
gap = (table.max(axis=1) - table[table.columns.max()]).round(2)
print("Accuracy lost at the largest batch size relative to the best batch size, per remedy (points):")
print(gap.to_string())
if (~trained).any():
    print(f"Did not train at any batch size (best accuracy ≤ 20%): {list(table.index[~trained])}")
ok = gap[trained]
print(f"Largest-batch gap: {ok.iloc[0]:.2f} points for '{ok.index[0]}'; smallest {ok.min():.2f} points "
      f"({ok.idxmin()}).")
second = table.columns[-2]
print(f"At batch size {second}: " + ", ".join(f"{r}: {v:.1f}%" for r, v in table[second].items()))
# one seed, and the final epoch only: how far the test accuracy swings over the last epochs says how much of a
# difference between remedies at one batch size is a finding
n_last = min(10, int(results.epoch.max()))
print(f"Test accuracy over the last {n_last} epochs at batch size {second} (min–max):")
for key, label in REMEDIES.items():
    ds = open_store(STUDIES / f"remedy_{key}" / "train.zarr", kind="train")
    run = int((ds.batch_size.values == second).argmax())
    acc = ds.test_acc.isel(run=run).values[-n_last:] * 100
    print(f"  {label}: {acc.min():.1f}–{acc.max():.1f}%")

# %% [markdown]
# ## What the digits data shows, and where it differs from the report
#
# The tables above are the findings of this run; the paragraph below is written from the full study in
# `analyses/README.md` and is checked against it when the study is re-run.
#
# On the full digits study (VGG13 at width 1/8, 20 epochs, η = 0.02 at m = 16, one seed): at batch size 256 the
# baseline (plain batch norm, constant η) reaches 92.8%, still climbing (64.9% ten epochs earlier). Ghost batch
# norm with the linear scaling rule (η = 0.32) ends at 94.4% and with gradual warmup at 53.8%, but at η = 0.32 these
# runs swing by tens of points from one epoch to the next (38–97% and 25–87% over the last 10 epochs), so the
# final-epoch difference between them is not a finding: this run does not reproduce the report's Experiment 4
# effect of warmup (an earlier run of this study ended at 75.8% without and 97.8% with warmup). What holds: the
# cyclic schedule with factor 10 collapses at 256 (46.5%, never higher over the last 10 epochs), as the report's
# did at 1024 (82.8%), and the √-scaled factor f = 10·√(16/m) rescues it (93.3%, 80–99% over the last 10 epochs),
# the report's Experiment 6 finding.
#
# Where digits differs: at m = 1024 an epoch of 1,438 images is 2 updates, 40 in the whole run, and no remedy
# recovers (31–40%); the report kept the large-batch gap down to 1.3 points on CIFAR-10's 50,000 images (49
# updates per epoch at m = 1024). On digits the largest batch size at which a remedy reaches the small-batch
# accuracy is 256, and only in some epochs.
