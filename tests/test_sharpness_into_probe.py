"""`gradlab sharpness --into PROBE_STORE`: curvature stored as a group of an existing probe store."""

from __future__ import annotations

import json

import pytest

from gradlab.cli import main
from gradlab.store import lock_path, open_store


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("into")
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"widths": [12]}', "--batch-sizes", "64",
                 "--epochs", "2", "--out", str(d / "runs"), "--no-progress"]) == 0
    ck = d / "runs" / "runs" / "bs64_lr0.01_seed0_sgd"
    assert main(["probe", "--checkpoint", f"early={ck / 'epoch002.pt'}", "--data", "digits", "--batch-sizes", "1,8,64",
                 "--budget", "64", "--trials", "4", "--protocol", "frozen", "--out", str(d / "norms.zarr"),
                 "--no-progress"]) == 0
    return d, ck


def test_sharpness_group_inside_probe_store_opens_cleanly_and_is_analysed(probe_store, capsys):
    d, ck = probe_store
    store = d / "norms.zarr"
    assert main(["sharpness", "--checkpoint", str(ck / "epoch002.pt"), "--data", "digits", "--samples", "64",
                 "--top-k", "2", "--hutchinson-probes", "4", "--eps", "1e-3", "--into", str(store),
                 "--no-progress"]) == 0
    # no foreign file inside the hierarchy (zarr would warn, and warnings are errors here)
    assert lock_path(store / "sharpness") == d / ".norms.zarr.sharpness.lock"
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".")) == []
    probe = open_store(store, kind="probe")
    assert probe.done.values.all()
    sharp = open_store(store, group="sharpness")
    assert sharp.attrs["gradlab_store"] == "sharpness" and sharp.lambda_max.notnull().all()
    capsys.readouterr()
    assert main(["analyze", str(store), "--json", "--no-figures", "--n-boot", "49"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "sharpness" in summary


def test_into_needs_a_probe_store(probe_store, tmp_path, capsys):
    _, ck = probe_store
    (tmp_path / "x").mkdir()
    assert main(["sharpness", "--checkpoint", str(ck / "epoch002.pt"), "--data", "digits", "--into",
                 str(tmp_path / "x")]) == 2
    assert "not a zarr v3 store" in capsys.readouterr().err


def test_into_refuses_a_checkpoint_the_probe_store_does_not_hold(probe_store, capsys):
    """--into puts curvature beside the probe's numbers of the same checkpoints; another checkpoint was accepted
    silently and then analysed beside the probe (an external user's report)."""
    d, ck = probe_store
    store = d / "norms.zarr"
    before = sorted(p.name for p in store.iterdir())
    capsys.readouterr()
    assert main(["sharpness", "--checkpoint", str(ck / "epoch000.pt"), "--data", "digits", "--into", str(store),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not one of the probe store's" in err[0] and "['early']" in err[0]
    assert sorted(p.name for p in store.iterdir()) == before
