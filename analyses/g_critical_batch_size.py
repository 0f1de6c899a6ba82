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
# # Does the noise scale predict the critical batch size? (issue 14)
#
# McCandlish et al. (2018) predict the critical batch size B_crit — beyond it, larger batches buy fewer steps only
# at a proportional cost in examples — with the gradient noise scale B_noise = tr Σ/‖G‖². Here B_crit is measured
# directly on the digits MLP of `analyses/configs/cbs_run.toml` (64-256-10, SGD at batch 32), at an early and a late
# checkpoint, and set against B_noise measured at the same checkpoints (`analyses/make_studies.sh`):
#
# - `cbs/cbs.zarr` (`gradlab cbs`): from each checkpoint, branches at every batch size of a grid continue training
#   for the same budget of examples, with a linear learning-rate rule and a small grid of factors per batch size,
#   several seeds (example streams) each;
# - `cbs/frozen.zarr` (`gradlab probe --protocol frozen`): ‖G‖², tr Σ and B_noise at the same checkpoints.
#
# Two estimators of B_crit (docs/science.md, "Critical batch size"): Merrill et al.'s (2025) branching rule (the
# largest batch size whose held-out loss after the budget is within ε of the smallest batch size's) and McCandlish
# et al.'s steps–examples trade-off fit. The blog's switch-batch-size-mid-run experiment is the same store read
# differently: from the early checkpoint of the batch-32 run, the branch at m = 32 continues the run, the others
# switch batch size at that point. Every sentence below is chosen by the numbers in the cell that prints it.

# %%
import json
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from gradlab.analysis.cbs import analyze_cbs, branch_curves
from gradlab.analysis.interval import Estimate
from gradlab.analysis.interval import format_estimate as fmt
from gradlab.cbs import estimators as est
from gradlab.figures import cbs as figs
from gradlab.store import open_store

STUDIES = Path(os.environ.get("GRADLAB_STUDIES", "../studies"))
N_BOOT = int(os.environ.get("GRADLAB_N_BOOT", "999"))
EPSILON = 0.05
root = STUDIES / "cbs"
summary = analyze_cbs(root / "cbs.zarr", root / "cbs-analysis", epsilon=EPSILON, n_boot=N_BOOT,
                      noise_store=root / "frozen.zarr", figures=False)
ds = open_store(root / "cbs.zarr", kind="cbs").load()
config = json.loads(ds.attrs["config"])
L, notes = branch_curves(ds, "test_loss")
labels = list(summary["checkpoints"])
early, late = labels[0], labels[-1]
bs = np.asarray(ds.batch_size.values)
print(f"cbs store: {config['data']!r}, checkpoints {labels} (epochs {[float(e) for e in ds.checkpoint_epoch.values]}), "
      f"batch sizes {[int(m) for m in bs]}, budget {config['budget']} examples, {config['seeds']} seeds, lr rule "
      f"{config['lr_scaling']} × factors {config['lr_factors']}, optimizer {config['checkpoints'][0]['optimizer']}")
for n in notes:
    print("note:", n)

# %% [markdown]
# ## B_crit by both estimators, and B_noise, per checkpoint

# %%
rows = summary["b_noise"]["per_checkpoint"]
for lab in labels:
    p = summary["checkpoints"][lab]
    print(f"{lab}: B_crit branching {fmt(p['branching']['b_crit'])}, steps–examples "
          f"{fmt((p['tradeoff'] or {}).get('b_crit'))}, B_noise {fmt(rows[lab].get('b_noise'))}; "
          f"target loss {p['target_loss']:.4g}, reached by batch sizes "
          f"{[int(m) for m, r in zip(bs, (p['tradeoff'] or {}).get('reached', [])) if r]}")

# %%
C = len(labels)
fig, axes = plt.subplots(1, C, figsize=(5.5 * C, 4), layout="constrained")
for c, ax in enumerate(np.atleast_1d(axes)):
    f_index = [list(ds.lr_factor.values).index(f) for f in summary["checkpoints"][labels[c]]["lr_factor_branching"]]
    figs.plot_curves(ds, L, c, f_index, ax, summary["checkpoints"][labels[c]]["target_loss"])
print(figs.CAPTIONS["cbs_curves"])

# %%
fig, axes = plt.subplots(2, C, figsize=(5.5 * C, 8), layout="constrained", squeeze=False)
for c, lab in enumerate(labels):
    figs.plot_branching(bs.astype(float), summary["checkpoints"][lab]["branching"], axes[0, c], lab)
    if summary["checkpoints"][lab]["tradeoff"]:
        figs.plot_tradeoff(bs.astype(float), summary["checkpoints"][lab]["tradeoff"], axes[1, c], lab)
print(figs.CAPTIONS["cbs_branching"])
print(figs.CAPTIONS["cbs_tradeoff"])

# %%
fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
figs.plot_b_noise(summary, ax)
print(figs.CAPTIONS["cbs_b_noise"])

# %% [markdown]
# ## Does B_noise predict B_crit?
#
# For each checkpoint and estimator: the ratio B_crit/B_noise with its interval. "Predicts" means the interval of
# the ratio holds 1; otherwise B_crit is smaller or larger than B_noise by the stated factor.


# %%
def verdict(r: Estimate) -> str:
    if not r.has_interval or not math.isfinite(r.value):
        return "undetermined (no interval)"
    if r.low <= 1 <= r.high:
        return "consistent with B_noise (ratio interval holds 1)"
    return f"{'smaller' if r.high < 1 else 'larger'} than B_noise (×{r.value:.2g} [{r.low:.2g}, {r.high:.2g}])"


def verdicts_of(summary: dict) -> dict:
    """The sentence of every (checkpoint, estimator), asserted against the ratio it is chosen by."""
    out = {}
    rows = summary["b_noise"]["per_checkpoint"]
    top = int(summary["batch_sizes"][-1])
    for lab, p in summary["checkpoints"].items():
        for name in ("branching", "tradeoff"):
            d = rows[lab].get(f"{name}_over_b_noise")
            r = Estimate.from_dict(d) if d else Estimate(math.nan)
            out[(lab, name)] = verdict(r)
            if r.has_interval and math.isfinite(r.value):  # the sentence follows the numbers
                assert out[(lab, name)].startswith("consistent") == (r.low <= 1 <= r.high)
                assert ("smaller" in out[(lab, name)]) == (r.high < 1)
            if name == "branching" and p["branching"]["censored"]:
                out[(lab, name)] += (f"; but censored: every batch size up to {top} is within ε, so B_crit is only "
                                     "bounded below (add larger batch sizes)")
            print(f"{lab}, {name}: B_crit is {out[(lab, name)]}")
    return out


verdicts = verdicts_of(summary)

# %% [markdown]
# Early vs late: does B_crit move the way B_noise does?

# %%
b_noise = {lab: Estimate.from_dict(rows[lab]["b_noise"]) for lab in labels if "b_noise" in rows[lab]}


def direction(a: Estimate, b: Estimate) -> str:
    if not (a.has_interval and b.has_interval):
        return "undetermined"
    return "grew" if b.low > a.high else "fell" if b.high < a.low else "no change distinguishable"


if early in b_noise and late in b_noise:
    noise_dir = direction(b_noise[early], b_noise[late])
    print(f"B_noise {noise_dir} from {early} to {late}: {b_noise[early].format()} -> {b_noise[late].format()}")
    for name in ("branching", "tradeoff"):
        ch = summary["early_vs_late"][name]
        if ch is None:
            print(f"{name}: no early-vs-late comparison (an estimate is missing)")
            continue
        r = Estimate.from_dict(ch["ratio"])
        agree = ch["claim"] == {"grew": "grew", "fell": "shrank"}.get(noise_dir, "no change distinguishable")
        assert ch["claim"] == ("grew" if r.has_interval and r.low > 1 else "shrank" if r.has_interval and r.high < 1
                               else "no change distinguishable")
        print(f"{name}: B_crit {ch['claim']} (late/early ×{r.format()}); "
              f"{'the same direction as' if agree else 'not the direction of'} B_noise")

# %% [markdown]
# ## Switching batch size mid-run (the blog's experiment, as branches)
#
# From the early checkpoint of the batch-m_c run, the branch at m_c continues the run and a branch at m > m_c
# switches batch size there; all see the same examples. Reported: the held-out loss after the budget relative to
# continuing at m_c, L(m)/L(m_c) − 1, with a bootstrap interval over seeds (paired: same example streams).

# %%
m_c = int(config["checkpoints"][0]["base_batch_size"])
c0 = 0
if m_c in bs:
    i_c = int(np.flatnonzero(bs == m_c)[0])
    f_best = [list(ds.lr_factor.values).index(f) for f in summary["checkpoints"][early]["lr_factor_branching"]]
    final = L[c0, np.arange(bs.size), f_best, :, -1]  # (M, R)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, final.shape[1], size=(N_BOOT, final.shape[1]))
    with np.errstate(invalid="ignore"):
        boot = np.nanmean(final[:, idx], axis=-1)  # (M, B)
        point = np.nanmean(final, axis=-1)
    a = est.expanded_alpha(final.shape[1], 0.95)
    for i in range(i_c + 1, bs.size):
        rel = boot[i] / boot[i_c] - 1
        e = Estimate(point[i] / point[i_c] - 1, float(np.quantile(rel, a)), float(np.quantile(rel, 1 - a)))
        what = ("costs held-out loss" if e.low > 0 else "improves held-out loss" if e.high < 0
                else "makes no distinguishable difference")
        assert (what == "costs held-out loss") == (e.low > 0)
        print(f"switching from {m_c} to {int(bs[i])} at {early} {what}: relative change {e.format()} after "
              f"{config['budget']} examples ({config['budget'] // int(bs[i])} instead of {config['budget'] // m_c} "
              "steps)")
else:
    print(f"the run's batch size {m_c} is not in the grid {list(bs)}: no switch comparison")

# %% [markdown]
# ## The same question on the zoo `gpt` character model
#
# `char_gpt/cbs.zarr` (`gradlab cbs`, branch by branch: the gpt is not a Linear/ReLU chain) branches from the early
# and late checkpoints of `f_char_gpt.py`'s run; `char_gpt/frozen.zarr` is that notebook's frozen probe at the same
# checkpoints. An example is one window of characters (`tokens_per_example` tokens); the budget counts windows.

# %%
gpt_root = STUDIES / "char_gpt"
if (gpt_root / "cbs.zarr").exists():
    gpt = analyze_cbs(gpt_root / "cbs.zarr", gpt_root / "cbs-analysis", epsilon=EPSILON, n_boot=N_BOOT,
                      noise_store=gpt_root / "frozen.zarr", figures=False)
    g_ds = open_store(gpt_root / "cbs.zarr", kind="cbs")
    print(f"gpt cbs store: batch sizes {gpt['batch_sizes']}, budget {gpt['budget']} windows of "
          f"{int(g_ds.attrs['tokens_per_example'])} tokens, {gpt['seeds']} seeds")
    for lab, p in gpt["checkpoints"].items():
        print(f"{lab}: B_crit branching {fmt(p['branching']['b_crit'])}, steps–examples "
              f"{fmt((p['tradeoff'] or {}).get('b_crit'))}, B_noise "
              f"{fmt(gpt['b_noise']['per_checkpoint'][lab].get('b_noise'))}")
    gpt_verdicts = verdicts_of(gpt)
else:
    print(f"no {gpt_root / 'cbs.zarr'}: run analyses/make_studies.sh for the gpt part")
