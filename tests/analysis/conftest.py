"""Synthetic probe stores for the analysis tests (pure numpy/zarr: no torch)."""

from __future__ import annotations

import pytest

from gradlab.synthetic import write_synthetic_store


@pytest.fixture(scope="session")
def frozen_store(tmp_path_factory):
    """Frozen protocol, two checkpoints with B_noise 16 → 48, α-stable entries (α = 1.5), vectors kept."""
    path = tmp_path_factory.mktemp("stores") / "frozen.zarr"
    truth = write_synthetic_store(path, protocol="frozen", grad_sq_norm=[1.0, 0.5], trace_cov=[16.0, 24.0],
                                  batch_sizes=(1, 2, 4, 8, 16, 32, 64), budget=64, trials=40, pool_size=512,
                                  replacement=False, entry_alpha=1.5, vector_dim=400, seed=3, trial_chunk=7)
    return path, truth


@pytest.fixture(scope="session")
def step_store(tmp_path_factory):
    """Step protocol (lr → 0 limit), sum reduction, draws with replacement."""
    path = tmp_path_factory.mktemp("stores") / "step.zarr"
    truth = write_synthetic_store(path, protocol="step", reduction="sum", replacement=True, trials=12,
                                  batch_sizes=(1, 2, 4, 8, 16), budget=16, seed=5)
    return path, truth
