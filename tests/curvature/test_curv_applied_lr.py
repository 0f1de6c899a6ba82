"""Sharpness relations use the learning rate applied at the checkpoint, not the run's base rate (issue 15 item 2).

A linearly scaled rule (η = lr·m/m_base) trains a tiny MLP; the sharpness store's ``train_lr`` must be the scaled
rate, and η/m and λ_max·η/2 must follow from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradlab.analysis.curvature import analyze
from gradlab.checkpoint import load_checkpoint
from gradlab.cli import main
from gradlab.curvature.run import applied_lr
from gradlab.lr_rules import LRRule
from gradlab.store import open_store


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaled")
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--data", "digits",
                 "--batch-sizes", "128", "--lr", "0.01", "--lr-scaling", "linear", "--base-batch-size", "16",
                 "--epochs", "1", "--checkpoint-epochs", "1", "--out", str(d / "runs"), "--no-progress"]) == 0
    ck = next((d / "runs" / "runs").iterdir()) / "epoch001.pt"
    assert main(["sharpness", "--checkpoint", str(ck), "--data", "digits", "--samples", "64", "--top-k", "1",
                 "--hutchinson-probes", "2", "--eps", "1e-3", "--out", str(d / "sharp.zarr"), "--no-progress"]) == 0
    return d, ck


def test_linear_rule_train_lr_is_the_scaled_rate(scaled_run):
    d, ck = scaled_run
    meta = load_checkpoint(ck).meta
    assert meta["lr"] == 0.01 and meta["lr_applied"] == pytest.approx(0.08, rel=1e-12)  # 0.01·128/16
    ds = open_store(d / "sharp.zarr", kind="sharpness")
    assert float(ds["train_lr"].values[0]) == pytest.approx(0.08, rel=1e-12)
    assert float(ds["train_lr_base"].values[0]) == 0.01
    ads, _ = analyze(ds, n_boot=0)
    lam = float(ds["lambda_max"].values[0])
    np.testing.assert_allclose(ads["eos_ratio"].values, lam * 0.08 / 2, rtol=1e-12)
    np.testing.assert_allclose(ads["lr_over_batch"].values, 0.08 / 128, rtol=1e-12)


@pytest.mark.parametrize("scaling, factor", [("linear", 8.0), ("sqrt", np.sqrt(8.0)), ("sum", 128.0),
                                             ("constant", 1.0)])
def test_applied_lr_from_a_recorded_rule(scaling, factor):
    """Checkpoints without ``lr_applied`` (older gradlab): the rule is evaluated at the checkpoint's step."""
    rule = LRRule(lr=0.01, batch_size=128, scaling=scaling, base_batch_size=16, warmup_epochs=0.0)
    meta = json.loads(json.dumps({"lr": 0.01, "batch_size": 128, "epoch": 3, "step": 30, "lr_rule": rule.describe()}))
    eta, source = applied_lr(meta)
    assert eta == pytest.approx(0.01 * factor, rel=1e-12) and "rule" in source


def test_applied_lr_follows_decay_and_warmup():
    rule = LRRule(lr=0.1, batch_size=64, scaling="linear", base_batch_size=32, decay_epochs=(2,), decay_factor=0.1)
    meta = {"lr": 0.1, "batch_size": 64, "epoch": 3, "step": 30, "lr_rule": rule.describe()}
    assert applied_lr(meta)[0] == pytest.approx(0.02, rel=1e-12)  # 0.1·2, decayed ×0.1 at epoch 2
    assert applied_lr({"lr": 0.1, "lr_applied": 0.05, "reduction": "sum", "batch_size": 4})[0] == pytest.approx(0.2)
    assert np.isnan(applied_lr({"epoch": 1})[0])
