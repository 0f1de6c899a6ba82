"""Training-store analyses: the log t law, grids, stable learning-rate ranges, figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from gradlab.analysis.training import final_table, grid, log_t_fit, log_t_fits, stable_lr_range  # noqa: E402
from gradlab.cli import main  # noqa: E402
from gradlab.store import open_store  # noqa: E402


def test_log_t_fit_recovers_exact_law_and_covers_noisy_slope():
    t = np.arange(0, 31)
    fit = log_t_fit(t, 2.0 + 0.7 * np.log(np.maximum(t, 1)))
    assert fit.a == pytest.approx(2.0) and fit.b == pytest.approx(0.7) and fit.r2 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        f = log_t_fit(t, 2.0 + 0.7 * np.log(np.maximum(t, 1)) + rng.normal(0, 0.1, t.size))
        covered += f.b_lo <= 0.7 <= f.b_hi
    assert 0.92 <= covered / 400 <= 0.98  # a 95% interval


def test_log_t_fit_with_too_few_points_is_nan():
    assert np.isnan(log_t_fit(np.array([0, 1, 2]), np.array([0.0, 1.0, 2.0])).b)


def test_stable_lr_range():
    df = pd.DataFrame({"batch_size": [8, 8, 8, 64, 64, 64], "lr": [0.1, 1.0, 10.0] * 2,
                       "trained": [True, True, False, True, False, False], "test_acc": [0.9] * 6})
    r = stable_lr_range(df).set_index("batch_size")
    assert r.loc[8, "lr_max"] == 1.0 and r.loc[64, "lr_max"] == 0.1 and r.loc[64, "n_stable"] == 1


def test_tables_from_a_real_train_store(tmp_path):
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"widths": [16]}', "--batch-sizes", "16,64",
                 "--lr", "0.05,1e30", "--epochs", "3", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    ds = open_store(tmp_path / "r" / "train.zarr")
    df = final_table(ds)
    assert set(df.columns) >= {"test_acc", "dist_init_weight", "dist_init_bias", "gen_gap", "trained"}
    assert df.set_index("lr").trained.loc[0.05].all() and not df.set_index("lr").trained.loc[1e30].any()
    g = grid(df, "test_acc")
    assert g.shape == (2, 2)
    assert stable_lr_range(df).lr_max.tolist() == [0.05, 0.05]
    assert len(log_t_fits(ds)) == 4
    from gradlab.figures.training import plot_distance_vs_epoch, plot_grid, plot_stable_lr

    fig, axes = plt.subplots(1, 3)
    plot_grid(g, axes[0], "test accuracy")
    plot_distance_vs_epoch(ds.isel(run=[0, 2]), axes[1])
    plot_stable_lr(stable_lr_range(df), axes[2])
    assert axes[1].get_ylabel().startswith("distance from init")
    plt.close(fig)
