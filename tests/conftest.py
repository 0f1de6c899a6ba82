"""Shared fixtures: tiny models and real checkpoints on the embedded digits data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def digits():
    from gradlab.datasets import load_data

    return load_data("digits")


@pytest.fixture()
def tiny_mlp(digits):
    import torch

    from gradlab.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model("mlp", digits.input_shape, 10, widths=[16, 12])
