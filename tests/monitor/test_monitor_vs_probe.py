"""The monitored B_noise against the frozen probe's at a checkpoint of the same run, on a real pair of stores.

``gradlab train`` (monitor every step) of an MLP 64-32-10 on digits, batch 256, 12 epochs (72 steps, 6 per
epoch), then ``gradlab probe --protocol frozen`` at the last checkpoint (40 trials of 256 examples, float64), then
``gradlab analyze`` on the probe store, which finds the run's ``monitor.zarr`` beside the checkpoint.  Both
estimate tr Σ/‖G‖² of the 1,438 training examples at (nearly) the checkpoint's θ: the probe at that θ (its
95% interval is ±3.3% wide), the monitor from its moving average (decay 0.95, n_eff ≈ 37 steps) at step 71, one
update before the checkpoint (±6%).  So a bias of a few percent in either -- e.g. taking the batch's ‖g_B‖² for
‖G‖², which moves B_noise by ~25% here -- fails the check.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from gradlab.cli import main

    d = tmp_path_factory.mktemp("pair")
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"widths": [32]}', "--data", "digits",
                 "--batch-sizes", "256", "--lr", "0.05", "--epochs", "12", "--checkpoint-epochs", "12",
                 "--monitor-every", "1", "--out", str(d / "t"), "--no-progress"]) == 0
    run = d / "t" / "runs" / "bs256_lr0.05_seed0_sgd"
    assert main(["probe", "--checkpoint", f"late={run / 'epoch012.pt'}", "--data", "digits", "--batch-sizes",
                 "1,256", "--budget", "256", "--trials", "40", "--protocol", "frozen", "--dtype", "float64",
                 "--out", str(d / "p.zarr"), "--no-progress"]) == 0
    return d, run


def test_monitor_and_frozen_probe_agree_within_their_intervals(pair, capsys):
    from gradlab.cli import main

    d, run = pair
    capsys.readouterr()
    assert main(["analyze", str(d / "p.zarr"), "--out", str(d / "pa"), "--no-figures"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((d / "pa" / "summary.json").read_text())
    (c,) = summary["monitor_comparison"]
    assert c["checkpoint"] == "late" and c["monitor_store"] == str(run / "monitor.zarr")
    assert c["checkpoint_step"] == 72 and c["step"] == 71 and c["steps_before_checkpoint"] == 1
    mon, probe = c["monitor"], c["probe"]
    # not vacuous: both intervals are narrow, and each holds the other's point estimate
    assert c["relative_half_width"]["monitor"] < 0.10 and c["relative_half_width"]["probe"] < 0.05
    assert probe["low"] <= mon["value"] <= probe["high"] and mon["low"] <= probe["value"] <= mon["high"]
    assert c["agree"]
    assert "monitor vs frozen probe at late (step 71, 1 before the checkpoint)" in err and "agree" in err


def test_a_probe_without_a_monitor_beside_its_checkpoint_reports_no_pair(pair, tmp_path):
    from gradlab.analysis.monitor import monitor_vs_probe
    from gradlab.store import open_store

    d, run = pair
    ds = open_store(d / "p.zarr")
    result = {"checkpoints": {"late": {"estimates": {"b_noise": {"value": 80.0, "low": 78.0, "high": 82.0}}}}}
    assert len(monitor_vs_probe(ds, result)) == 1
    assert monitor_vs_probe(ds.assign_coords(checkpoint_path=("checkpoint", [str(tmp_path / "x.pt")])),
                            result) == []


def test_a_probe_estimate_without_an_interval_is_compared_without_crashing(pair):
    """Regression: ``gradlab analyze --n-boot 0`` (or a B_noise with no finite bound) stores low/high as None."""
    from gradlab.analysis.monitor import comparison_note, monitor_vs_probe
    from gradlab.store import open_store

    d, _ = pair
    result = {"checkpoints": {"late": {"estimates": {"b_noise": {"value": 80.0, "low": None, "high": None}}}}}
    (c,) = monitor_vs_probe(open_store(d / "p.zarr"), result)
    assert c["agree"] is None and comparison_note(c).endswith("no interval to compare")
