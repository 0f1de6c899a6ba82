"""`gradlab cbs` end to end: the store, kill/resume gives the identical store, bad input is one line and exit 2
with nothing written, and `gradlab analyze` reports both estimators and B_crit / B_noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cbs_cases import cbs_argv, assert_same_store, make_checkpoints
from gradlab.cli import main
from gradlab.errors import UsageError

GRID = ["--data", "digits", "--batch-sizes", "4,16,64", "--budget", "256", "--seeds", "5", "--evals", "8",
        "--eval-examples", "256", "--lr-factors", "1,2", "--no-progress"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ck"))


def _args(ckpts, out, *extra):
    return cbs_argv(ckpts, GRID, out, *extra)


@pytest.fixture(scope="module")
def store(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "cbs.zarr"
    assert main(_args(ckpts, out)) == 0
    return out


def test_store_layout_and_recipe_from_meta(store):
    from gradlab.store import open_store

    ds = open_store(store, kind="cbs")
    assert ds.test_loss.dims == ("checkpoint", "batch_size", "lr_factor", "seed", "eval")
    assert ds.test_loss.shape == (2, 3, 2, 5, 9) and bool(ds.done.all())
    assert np.isfinite(ds.test_loss.values).all() and (ds.diverged_step.values == -1).all()
    cfg = json.loads(ds.attrs["config"])
    assert cfg["checkpoints"][0]["optimizer"] == "sgd" and cfg["checkpoints"][0]["base_lr"] == 0.05
    np.testing.assert_allclose(ds.lr.values[0, :, 1], [0.1, 0.1, 0.1])  # constant rule, factor 2
    assert ds.examples_seen.values[-1, -1] == 256 and ds.steps.values[0, -1] == 64
    # every branch starts from its checkpoint: the loss at eval 0 is the same for all batch sizes, factors, seeds
    first = ds.test_loss.values[..., 0]
    assert np.ptp(first[0]) < 1e-6 and np.ptp(first[1]) < 1e-6
    assert ds.test_loss.attrs["long_name"] and ds.test_loss.attrs["units"] == "nats"
    assert "provenance" in ds.attrs and "torch_threads" in ds.attrs and "input_sha256" in ds.attrs


def test_interrupted_store_resumes_to_the_identical_store(ckpts, store, tmp_path, monkeypatch):
    from gradlab.cbs.job import CbsJob

    calls = {"n": 0}
    real = CbsJob.compute

    def flaky(self, state, unit, ctx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, state, unit, ctx)

    out = tmp_path / "cbs.zarr"
    monkeypatch.setattr(CbsJob, "compute", flaky)
    assert main(_args(ckpts, out)) == 130
    monkeypatch.setattr(CbsJob, "compute", real)
    from gradlab.store import open_store

    assert int(open_store(out, kind="cbs").done.values.sum()) == 2
    assert main(_args(ckpts, out, "--resume")) == 0
    assert_same_store(out, store)


@pytest.mark.parametrize("extra, message", [
    (["--batch-sizes", "4,2048", "--budget", "4096"], "larger than the 1438 training examples"),
    (["--batch-sizes", "4,64", "--budget", "32"], "smaller than the largest batch size 64"),
    (["--batch-sizes", "4,48", "--budget", "256"], "do not divide the budget of 256 examples"),
    (["--budget-tokens", "256", "--batch-sizes", "4,512", "--data", "shakespeare-char"],
     "smaller than the largest batch size 512"),
    (["--lr-factors", "1,-2"], "--lr-factors must be > 0"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--momentum", "1.5"], "--momentum must be below 1"),
    (["--batch-sizes", "4,x"], "comma-separated list"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ckpts, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.zarr"
    args = _args(ckpts, out, *extra)
    if "--budget-tokens" in extra:  # instead of --budget
        i = args.index("--budget")
        del args[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not any(tmp_path.iterdir())


def test_checkpoint_without_recipe_meta_needs_flags(tmp_path, capsys):
    import torch

    from gradlab.checkpoint import Recipe, save_checkpoint
    from gradlab.models import build_model

    net = build_model("mlp", (1, 8, 8), 10, widths=[8])
    path = save_checkpoint(tmp_path / "bare.pt", net, Recipe("mlp", {"widths": [8]}, (1, 8, 8), 10), {"epoch": 1})
    del torch
    args = ["cbs", "--checkpoint", str(path), *GRID, "--out", str(tmp_path / "x.zarr")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()  # all three missing parts in one line, each with its flag
    assert "records no optimizer, no learning rate (lr_applied), no training batch size" in err
    assert "pass --optimizer sgd|adam and --lr" in err and "--base-batch-size" in err and len(err.splitlines()) == 1
    assert main([*args, "--optimizer", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "records no learning rate" in err and "no optimizer" not in err and "--optimizer" not in err
    assert main([*args, "--optimizer", "sgd", "--lr", "0.05", "--base-batch-size", "32",
                 "--batch-sizes", "16,64", "--lr-factors", "1"]) == 0


def test_resume_with_other_flags_is_refused(ckpts, store, capsys):
    assert main(_args(ckpts, store, "--resume", "--seeds", "6")) == 2
    assert "different config" in capsys.readouterr().err


def test_diverged_branches_are_recorded_and_excluded(ckpts, tmp_path, capsys):
    out = tmp_path / "div.zarr"
    assert main(_args(ckpts, out, "--lr-factors", "1,20000")) == 0
    from gradlab.store import open_store

    ds = open_store(out, kind="cbs")
    div = ds.diverged_step.values
    assert (div[:, :, 0] == -1).all() and (div[:, :, 1] >= 0).any()
    rep = tmp_path / "rep"
    assert main(["analyze", str(out), "--out", str(rep), "--n-boot", "99", "--no-figures"]) == 0
    summary = json.loads((rep / "summary.json").read_text())
    assert any("diverged branch(es) excluded" in n for n in summary["notes"])
    assert all(f == 1.0 for p in summary["checkpoints"].values() for f in p["lr_factor_branching"])


def test_analyze_reports_both_estimators_and_the_ratio_to_b_noise(ckpts, store, tmp_path, capsys):
    frozen = tmp_path / "frozen.zarr"
    assert main(["probe", "--checkpoint", f"early={ckpts['early']}", "--checkpoint", f"late={ckpts['late']}",
                 "--data", "digits", "--protocol", "frozen", "--batch-sizes", "1,8,64", "--budget", "64",
                 "--trials", "8", "--out", str(frozen), "--no-progress"]) == 0
    rep = tmp_path / "rep"
    assert main(["analyze", str(store), "--out", str(rep), "--n-boot", "199", "--noise-store", str(frozen),
                 "--epsilon", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "B_crit branching" in printed and "B_noise" in printed
    assert "(grid: crossing between" in printed or "(grid: ≥ 64" in printed  # the bracket beside the interval
    s = json.loads((rep / "summary.json").read_text())
    assert s["gradlab_store"] == "cbs" and set(s["checkpoints"]) == {"early", "late"}
    for label, p in s["checkpoints"].items():
        b = p["branching"]["b_crit"]
        assert b["value"] is not None and 4 <= b["value"] <= 64
        row = s["b_noise"]["per_checkpoint"][label]
        assert row["by"] == "sha256" and row["b_noise"]["value"] > 0
        r = row["branching_over_b_noise"]
        assert r["value"] == pytest.approx(b["value"] / row["b_noise"]["value"])
    assert s["early_vs_late"]["branching"]["claim"]
    captions = json.loads((rep / "captions.json").read_text())
    assert {"cbs_curves", "cbs_branching", "cbs_b_noise"} <= set(captions)
    assert (rep / "report.html").exists() and (rep / "cbs_branching.png").exists()
    import gradlab

    api = gradlab.analyze(store, out=tmp_path / "api", figures=False, n_boot=199, noise_store=frozen, epsilon=0.1)
    assert api["checkpoints"] == s["checkpoints"] and api["b_noise"] == s["b_noise"]  # the flags, as keywords
    capsys.readouterr()
    assert main(["analyze", str(frozen), "--out", str(tmp_path / "no"), "--epsilon", "0.1"]) == 2  # not ignored
    err = capsys.readouterr().err.strip()
    assert "--epsilon applies to cbs stores" in err and "'probe' store" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "no").exists()
    with pytest.raises(UsageError, match="noise_store=, cbs_loss= apply to cbs stores"):
        gradlab.analyze(frozen, out=tmp_path / "no", noise_store=frozen, cbs_loss="train_loss")
    with pytest.raises(UsageError, match="ref_batch_size= applies to probe stores"):
        gradlab.analyze(store, out=tmp_path / "no", ref_batch_size=4)


def test_b_noise_from_a_monitor_store_at_the_checkpoint_steps(tmp_path):
    from gradlab.analysis.cbs import analyze_cbs

    assert main(["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--data", "digits", "--batch-sizes",
                 "128", "--lr", "0.1", "--epochs", "2", "--checkpoint-epochs", "1,2", "--monitor-every", "1",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    run = tmp_path / "r" / "runs" / "bs128_lr0.1_seed0_sgd"
    assert main(["cbs", "--checkpoint", f"e={run / 'epoch001.pt'}", "--checkpoint", f"l={run / 'epoch002.pt'}",
                 "--data", "digits", "--batch-sizes", "16,64", "--budget", "128", "--seeds", "2", "--evals", "2",
                 "--out", str(tmp_path / "c.zarr"), "--no-progress"]) == 0
    s = analyze_cbs(tmp_path / "c.zarr", tmp_path / "rep", n_boot=0, noise_store=run / "monitor.zarr", figures=False)
    rows = s["b_noise"]["per_checkpoint"]
    assert rows["e"]["b_noise"]["value"] > 0 and rows["e"]["b_noise"]["note"] is None  # step 12 was recorded
    assert "last recorded before the checkpoint's step 24" in rows["l"]["b_noise"]["note"]


def test_ratio_interval_combines_log_half_widths():
    import math

    from gradlab.analysis.cbs import ratio
    from gradlab.analysis.interval import Estimate

    r = ratio(Estimate(100, 50, 400), Estimate(10, 5, 20))
    assert r.value == 10
    assert r.low == pytest.approx(10 * math.exp(-math.hypot(math.log(2), math.log(2))))
    assert r.high == pytest.approx(10 * math.exp(math.hypot(math.log(4), math.log(2))))
    assert ratio(Estimate(100, 50, math.inf), Estimate(10, 5, 20)).high == math.inf
    assert not ratio(Estimate(100), Estimate(10, 5, 20)).has_interval


def test_python_api_writes_the_same_store(ckpts, store, tmp_path):
    import gradlab.api

    ds = gradlab.api.cbs([f"early={ckpts['early']}", f"late={ckpts['late']}"], data="digits", out=tmp_path / "a.zarr",
                         batch_sizes=[4, 16, 64], budget=256, seeds=5, n_evals=8, eval_examples=256,
                         lr_factors=(1.0, 2.0))
    assert ds.attrs["gradlab_store"] == "cbs"
    assert_same_store(tmp_path / "a.zarr", store)


def test_branches_on_dask_worker_processes_write_the_identical_store(ckpts, store, tmp_path):
    """Each (checkpoint, batch size) unit computed by Dask worker processes: the store is the local one, bitwise
    (assert_same_store compares every variable)."""
    from distributed import LocalCluster

    out = tmp_path / "dask.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert main(_args(ckpts, out, "--scheduler", cluster.scheduler_address)) == 0
    assert_same_store(out, store)


@pytest.mark.parametrize("stage", ["write:3", "done:2"])
def test_a_killed_cbs_run_resumes_to_the_identical_store(ckpts, store, tmp_path, stage):
    """SIGKILL of the process right after a unit's arrays are written (not yet marked done) or right after it is
    marked done; --resume recomputes what is not done and the store is the uninterrupted one, bitwise."""
    import os
    import subprocess
    import sys

    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "gradlab", *_args(ckpts, out)]
    env = {**os.environ, "GRADLAB_KILL_AFTER": stage}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert main(_args(ckpts, out, "--resume")) == 0
    assert_same_store(out, store)


def test_more_eval_examples_than_the_training_set_is_refused_and_the_default_fits(ckpts, tmp_path, monkeypatch):
    """--eval-examples above the training set was clipped silently while the store's long_name kept the asked-for
    number (an external user's report), then clipped with only a log line; asking for more examples than exist is
    now refused in one line naming the training set's size.  Left out, the default is min(1024, the training set),
    and the store's long_name holds the real count."""
    from gradlab.cbs.resolve import resolve_cbs
    from gradlab.errors import UsageError
    from gradlab.schema.cbs import cbs_variables

    kw = dict(data="digits", batch_sizes=[4, 16], budget=64, seeds=2, n_evals=2)
    with pytest.raises(UsageError, match="--eval-examples 1000000 is more than the 1438 training examples"):
        resolve_cbs([f"early={ckpts['early']}"], eval_examples=10**6, **kw)
    assert resolve_cbs([f"early={ckpts['early']}"], eval_examples=1438, **kw).eval_examples == 1438
    assert resolve_cbs([f"early={ckpts['early']}"], **kw).eval_examples == 1024  # the default, digits has 1438
    # a training set smaller than the default: all of it, and the long_name says how many
    (tmp_path / "small_digits.py").write_text(
        "from gradlab.datasets import DataBundle, Split, load_data\n"
        "def data():\n"
        "    d = load_data('digits')\n"
        "    return DataBundle(name='small', train=Split(d.train.x[:300], d.train.y[:300]), test=d.test,\n"
        "                      n_classes=d.n_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    job = resolve_cbs([f"early={ckpts['early']}"], **{**kw, "data": "small_digits:data"})
    assert job.eval_examples == job.pool_size == 300
    train_loss = next(v for v in cbs_variables(job.loss, eval_examples=job.eval_examples, diverge_factor=10.0)
                      if v.name == "train_loss")
    assert "on 300 fixed training examples" in train_loss.long_name


def test_no_improvement_within_the_budget_estimates_no_tradeoff():
    """The smallest batch size's held-out loss never falls below the checkpoint's: the default target would lie
    above the start, every curve would 'reach' it at step 0 and B_crit read inf [inf, inf].  Not estimated now."""
    import xarray as xr

    from gradlab.analysis.cbs import analyze_checkpoint

    bs = np.array([4.0, 16.0, 64.0])
    J, R = 5, 4
    steps = np.stack([np.round(np.linspace(0, 256 / m, J)) for m in bs])
    ds = xr.Dataset(coords={"batch_size": bs, "lr_factor": [1.0], "checkpoint": ["c"], "checkpoint_epoch": [1.0]})
    ds["steps"] = (("batch_size", "eval"), steps)
    rng = np.random.default_rng(0)
    L = 1.0 + 0.01 * np.arange(J) + 0.001 * rng.standard_normal((1, 3, 1, R, J))  # rises: no improvement
    out = analyze_checkpoint(ds, 0, L, epsilon=0.05, target_loss=None, target_fraction=0.5, n_boot=0, rng=rng)
    assert out["tradeoff"] is None and math.isnan(out["target_loss"])
    assert any("trade-off is not estimated" in n for n in out["notes"])
    L = 1.0 - 0.05 * np.arange(J) * (1 + 0 * bs[None, :, None, None, None]) + 0 * L  # improves: estimated
    out = analyze_checkpoint(ds, 0, L, epsilon=0.05, target_loss=None, target_fraction=0.5, n_boot=0, rng=rng)
    assert out["tradeoff"] is not None and out["target_loss"] < 1.0
