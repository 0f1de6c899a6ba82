"""`gradlab demo --quick`: every step end to end on real stores, with warnings as errors, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradlab.cli import main
from gradlab.store import open_store


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_every_store_and_report(demo_dir):
    for name in ("train/train.zarr", "frozen.zarr", "step.zarr", "sharpness.zarr"):
        ds = open_store(demo_dir / name)
        assert ds.done.values.all(), name
    index = json.loads((demo_dir / "report" / "summary.json").read_text())
    assert set(index["summaries"]) == {"frozen", "step", "sharpness"}
    assert (demo_dir / "report" / "index.html").read_text().count("<img") >= 10
    frozen = open_store(demo_dir / "frozen.zarr")
    assert np.isfinite(frozen.b_noise.values).all() and (frozen.b_noise.values > 0).all()


def test_analysis_of_a_parameter_subset_store_does_not_warn(demo_dir):
    """Regression: all-NaN norms of layers outside --params made dask divide 0/0 (a RuntimeWarning)."""
    step = open_store(demo_dir / "step.zarr")
    assert not step.selected.values.all()
    analysis = open_store(demo_dir / "step.zarr", group="analysis")
    assert np.isfinite(analysis.grad_norm_mean.values).all()


def test_demo_refuses_a_non_empty_folder_and_resumes(demo_dir, capsys):
    assert main(["demo", "--quick", "--out", str(demo_dir), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(demo_dir), "--no-progress", "--resume"]) == 0
