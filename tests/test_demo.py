"""`gradlab demo --quick`: every step end to end on real stores, with warnings as errors, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradlab.cli import main
from gradlab.store import open_store


# `gradlab demo --quick` recorded on this branch (issue 15): headline U-statistics and β of ‖s_B‖ per checkpoint
RECORDED_QUICK = {
    "early": {"grad_sq_norm": 0.011626809197518856, "trace_cov": 2.0820007775966847, "b_noise": 179.06897259834457,
              "beta": 0.532797791708067},
    "late": {"grad_sq_norm": 0.011689827576898876, "trace_cov": 2.089321293026693, "b_noise": 178.72986400206227,
             "beta": 0.5339951969373599},
}


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


def test_results_table_is_generated_from_the_summaries(demo_dir):
    """Issue 15 item 9: the README's results table is the demo's generated ``report/results_table.md``."""
    from gradlab.demo import DemoConfig, results_table

    index = json.loads((demo_dir / "report" / "summary.json").read_text())
    table = (demo_dir / "report" / "results_table.md").read_text()
    assert table == results_table(index["summaries"], DemoConfig.quick())
    assert "nan" not in table and "inf" not in table and table.count("\n") == 8


def test_quick_demo_headline_numbers_match_the_recorded_run(demo_dir):
    """The quick demo's headline numbers against a recorded run (tolerance 2%: torch CPU kernels may differ in the
    last bits across machines, and the frozen statistics sum 256 float32 per-example products)."""
    index = json.loads((demo_dir / "report" / "summary.json").read_text())
    ck = index["summaries"]["frozen"]["checkpoints"]
    got = {c: {k: ck[c]["estimates"][k]["value"] for k in ("grad_sq_norm", "trace_cov", "b_noise")}
           | {"beta": ck[c]["power_law"]["minibatch_sum_rms"]["beta"]["value"]} for c in ("early", "late")}
    for c, values in RECORDED_QUICK.items():
        for k, v in values.items():
            assert got[c][k] == pytest.approx(v, rel=0.02), (c, k, got[c][k], v)
    for c in ("early", "late"):  # the crossover of the finite-population fit estimates B_noise (issue 15 item 1)
        cross = ck[c]["power_law"]["minibatch_sum_rms"]["crossover"]
        assert cross["low"] <= got[c]["b_noise"] <= cross["high"] or cross["high"] == "inf"
    assert all(ch["paired"] for ch in index["summaries"]["frozen"]["comparison"])  # common draws (item 5)
