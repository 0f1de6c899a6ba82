"""`gradlab cbs` / `gradlab analyze` on a cbs store at the edges: targets no batch size reaches, every branch
diverged, one batch size or one seed, B_noise from a noise store of other checkpoints, flags out of range,
argparse's own errors, and the divergence rule at a low-loss checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cbs_cases import cbs_argv, make_checkpoints, make_low_loss_checkpoint
from gradlab.cli import main

GRID = ["--data", "digits", "--batch-sizes", "4,16,64", "--budget", "256", "--seeds", "2", "--evals", "4",
        "--eval-examples", "256", "--no-progress"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ck"))


def _cbs(ckpts, out, *extra):
    return cbs_argv(ckpts, GRID, out, *extra)


@pytest.fixture(scope="module")
def store(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "cbs.zarr"
    assert main(_cbs(ckpts, out)) == 0
    return out


@pytest.fixture(scope="module")
def diverged_store(ckpts, tmp_path_factory):
    """Every branch diverges (learning rate 0.05 × 20000)."""
    out = tmp_path_factory.mktemp("d") / "div.zarr"
    assert main(_cbs(ckpts, out, "--lr-factors", "20000")) == 0
    from gradlab.store import open_store

    assert (open_store(out, kind="cbs").diverged_step.values >= 0).all()
    return out


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


# -- 1. figures when nothing reaches the target or every branch diverged --------------------------------------


def test_unreachable_target_writes_every_figure_and_says_so(store, tmp_path, capsys):
    """--target-loss 1e-6 (no batch size gets there) died in the trade-off figure ("Data cannot be log-scaled");
    now every figure is written and summary.json, the captions, the report and stdout say the target was never
    reached (nothing extrapolated)."""
    rep = tmp_path / "rep"
    assert main(["analyze", str(store), "--out", str(rep), "--n-boot", "0", "--target-loss", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "no batch size reaches the target loss 1e-06 within the budget" in out
    for stem in ("cbs_curves", "cbs_branching", "cbs_tradeoff", "cbs_b_noise"):
        assert (rep / f"{stem}.png").stat().st_size > 0 and (rep / f"{stem}.svg").exists()
    s = json.loads((rep / "summary.json").read_text())
    for p in s["checkpoints"].values():
        t = p["tradeoff"]
        assert t["n_reached"] == 0 and not any(t["reached"]) and all(v is None for v in t["steps"])
        assert t["b_crit"]["value"] is None
        assert "none extrapolated" in t["notes"][-1] and "raise the target loss" in t["notes"][-1]
    captions = json.loads((rep / "captions.json").read_text())
    assert "no batch size reached the target loss 1e-06" in captions["cbs_tradeoff"]
    assert "no batch size reached the target loss 1e-06" in (rep / "report.html").read_text()


def test_every_branch_diverged_writes_the_figures_it_can(diverged_store, tmp_path, capsys):
    """Every branch diverged: the curves and the branching ratio had nothing to log-scale and the analysis died
    with a traceback; now the figures say so, and the checkpoint's loss is still reported (the first evaluation,
    before any branch diverged)."""
    rep = tmp_path / "rep"
    assert main(["analyze", str(diverged_store), "--out", str(rep), "--n-boot", "0"]) == 0
    assert "every branch at the smallest batch size diverged" in capsys.readouterr().out
    for stem in ("cbs_curves", "cbs_branching", "cbs_b_noise"):
        assert (rep / f"{stem}.png").stat().st_size > 0
    s = json.loads((rep / "summary.json").read_text())
    for p in s["checkpoints"].values():
        assert p["branching"]["b_crit"]["value"] is None and p["tradeoff"] is None
        assert 1.0 < p["loss_at_checkpoint"] < 3.0  # the checkpoint's own loss, not NaN
        assert "diverged" in p["tradeoff_not_estimated"]
    captions = json.loads((rep / "captions.json").read_text())
    assert "every branch at the smallest batch size diverged" in captions["cbs_branching"]
    # with a target given, the trade-off figure is drawn too and says why there is nothing to fit
    rep2 = tmp_path / "rep2"
    assert main(["analyze", str(diverged_store), "--out", str(rep2), "--n-boot", "0", "--target-loss", "1"]) == 0
    assert (rep2 / "cbs_tradeoff.png").stat().st_size > 0
    s = json.loads((rep2 / "summary.json").read_text())
    assert all("every branch of every batch size diverged" in p["tradeoff"]["notes"][-1]
               for p in s["checkpoints"].values())


def test_one_seed_store_analyses_with_figures(ckpts, tmp_path):
    out = tmp_path / "one_seed.zarr"
    args = _cbs(ckpts, out)
    args[args.index("--seeds") + 1] = "1"
    assert main(args) == 0
    rep = tmp_path / "rep"
    assert main(["analyze", str(out), "--out", str(rep), "--n-boot", "99"]) == 0
    assert (rep / "cbs_branching.png").exists() and (rep / "report.html").exists()


@pytest.mark.filterwarnings("error")
def test_figure_functions_draw_empty_and_degenerate_data():
    """Each plot function on data with nothing finite (every branch diverged, no batch size reaching the target,
    a single batch size) saves without matplotlib's log-scale error or any warning."""
    import io

    import xarray as xr
    from matplotlib.figure import Figure

    from gradlab.figures import cbs as fig_cbs

    bs = np.array([4.0, 16.0])
    nan_est = {"value": None, "low": None, "high": None, "level": 0.95, "note": "why"}
    branching = {"ratio": [None, None], "epsilon": 0.05, "b_crit": nan_est, "n_seeds": [0, 0]}
    tradeoff = {"steps": [None, None], "examples": [None, None], "s_min": nan_est, "e_min": nan_est,
                "b_crit": nan_est, "target": 1e-6, "reached": [False, False], "notes": ["why"]}
    ds = xr.Dataset(coords={"batch_size": bs, "checkpoint": ["c"]})
    ds["examples_seen"] = (("batch_size", "eval"), np.array([[0, 8, 16], [0, 16, 16]]), {"long_name": "examples"})
    ds["test_loss"] = (("eval",), np.zeros(3), {"long_name": "held-out loss", "units": "nats"})
    L = np.full((1, 2, 1, 2, 3), np.nan)
    result = {"checkpoints": {"c": {"branching": {"b_crit": nan_est}, "tradeoff": None}}}
    draws = [lambda ax: fig_cbs.plot_curves(ds, L, 0, [0, 0], ax, 1e-6),
             lambda ax: fig_cbs.plot_branching(bs, branching, ax, "c"),
             lambda ax: fig_cbs.plot_branching(bs[:1], {**branching, "ratio": [0.0]}, ax, "c"),
             lambda ax: fig_cbs.plot_tradeoff(bs, tradeoff, ax, "c"),
             lambda ax: fig_cbs.plot_b_noise(result, ax)]
    for draw in draws:
        fig = Figure(figsize=(4, 3), layout="constrained")
        draw(fig.subplots())
        fig.savefig(io.BytesIO(), format="png")


def test_one_batch_size_gives_no_branching_estimate_instead_of_an_index_error():
    from gradlab.cbs import estimators as est

    res = est.branching_estimate(np.ones((1, 6)), [16], 0.05, n_boot=99)
    assert math.isnan(res.b_crit.value) and "one batch size only" in res.b_crit.note


# -- 2. which way to move the target --------------------------------------------------------------------------


def test_no_fit_advice_says_which_way_to_move_the_target():
    """A target no batch size reaches needs a *higher* target loss (the old advice said 'lower the target'); a
    target above every curve's start reached everything at step 0 and read B_crit = inf ('S_min ≤ 0')."""
    from gradlab.cbs import estimators as est

    bs = np.array([4.0, 16.0, 64.0])
    steps = np.stack([np.arange(5) * (64 // int(m)) for m in bs])
    L = np.exp(-0.05 * steps * bs[:, None] / 4)[:, None, :].repeat(3, 1)  # (M, R, J), from 1 downwards
    low = est.tradeoff_estimate(steps, L, bs, 1e-6, n_boot=0)
    assert math.isnan(low.b_crit.value) and "raise the target loss" in low.b_crit.note
    assert "lower the target" not in low.b_crit.note
    high = est.tradeoff_estimate(steps, L, bs, 5.0, n_boot=0)  # every curve starts below 5
    assert math.isnan(high.b_crit.value) and "lower the target loss" in high.b_crit.note


# -- 3. B_noise from the right run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two training runs with monitors (learning rates 0.1 and 0.2) and a cbs store from the first one's
    checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    for lr in ("0.1", "0.2"):
        assert main(["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--data", "digits",
                     "--batch-sizes", "128", "--lr", lr, "--epochs", "2", "--checkpoint-epochs", "1,2",
                     "--monitor-every", "1", "--out", str(root / lr), "--no-progress"]) == 0
    a = root / "0.1" / "runs" / "bs128_lr0.1_seed0_sgd"
    b = root / "0.2" / "runs" / "bs128_lr0.2_seed0_sgd"
    out = root / "c.zarr"
    assert main(["cbs", "--checkpoint", f"e={a / 'epoch001.pt'}", "--checkpoint", f"l={a / 'epoch002.pt'}",
                 "--data", "digits", "--batch-sizes", "16,64", "--budget", "128", "--seeds", "2", "--evals", "2",
                 "--out", str(out), "--no-progress"]) == 0
    return {"a": a, "b": b, "cbs": out, "root": root}


def test_monitor_store_of_another_run_is_refused(runs, tmp_path, capsys):
    """The checkpoints were matched to the monitor by step alone, so another run's monitor (same steps) silently
    gave B_noise; the run recorded on both sides must now agree."""
    rep = tmp_path / "rep"
    assert main(["analyze", str(runs["cbs"]), "--out", str(rep), "--n-boot", "0", "--no-figures",
                 "--noise-store", str(runs["b"] / "monitor.zarr")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "is not of these checkpoints" in line and "another training run" in line and "lr 0.1 vs 0.2" in line
    assert not (rep / "summary.json").exists()
    assert main(["analyze", str(runs["cbs"]), "--out", str(rep), "--n-boot", "0", "--no-figures",
                 "--noise-store", str(runs["a"] / "monitor.zarr")]) == 0
    rows = json.loads((rep / "summary.json").read_text())["b_noise"]["per_checkpoint"]
    assert rows["e"]["by"] == rows["l"]["by"] == "run and step" and rows["e"]["b_noise"]["value"] > 0
    assert "same run, seed, batch_size, lr" in rows["e"]["identity"]


def test_checkpoint_without_run_identity_is_paired_by_step_with_a_note(runs, tmp_path, capsys):
    """A checkpoint whose meta names no training run (not written by gradlab train) cannot be checked against
    the monitor: it is paired by step, and summary.json, the report and stderr say so."""
    from gradlab.checkpoint import load_checkpoint, save_checkpoint
    from gradlab.models import build_model

    src = load_checkpoint(runs["a"] / "epoch001.pt")
    net = build_model("mlp", (1, 8, 8), 10, widths=[8])
    net.load_state_dict(src.state_dict)
    bare = save_checkpoint(tmp_path / "bare.pt", net, src.recipe, {"epoch": 1, "step": 12})
    out = tmp_path / "bare.zarr"
    assert main(["cbs", "--checkpoint", f"e={bare}", "--data", "digits", "--batch-sizes", "16,64", "--budget", "128",
                 "--seeds", "2", "--evals", "2", "--optimizer", "sgd", "--lr", "0.1", "--base-batch-size", "128",
                 "--out", str(out), "--no-progress"]) == 0
    rep = tmp_path / "rep"
    capsys.readouterr()
    assert main(["analyze", str(out), "--out", str(rep), "--n-boot", "0", "--noise-store",
                 str(runs["b"] / "monitor.zarr")]) == 0
    assert "paired with the monitor by training step only" in capsys.readouterr().err
    s = json.loads((rep / "summary.json").read_text())
    assert s["b_noise"]["per_checkpoint"]["e"]["by"] == "step only"
    assert any("by training step only" in n and "identity not checked" in n for n in s["notes"])
    assert "by training step only" in (rep / "report.html").read_text()


def test_probe_store_of_other_checkpoints_with_the_same_labels_is_refused(ckpts, store, runs, tmp_path, capsys):
    """A probe store whose 'early'/'late' are other files was matched by label; a label whose SHA-256 differs is
    another checkpoint.  Without a recorded SHA-256 the pairing is by label, with a note."""
    other = tmp_path / "other.zarr"
    assert main(["probe", "--checkpoint", f"early={runs['a'] / 'epoch001.pt'}", "--checkpoint",
                 f"late={runs['a'] / 'epoch002.pt'}", "--data", "digits", "--protocol", "frozen", "--batch-sizes",
                 "1,8", "--budget", "8", "--trials", "4", "--out", str(other), "--no-progress"]) == 0
    rep = tmp_path / "rep"
    capsys.readouterr()
    assert main(["analyze", str(store), "--out", str(rep), "--n-boot", "0", "--no-figures", "--noise-store",
                 str(other)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "holds a checkpoint labelled 'early' with SHA-256" in line and "frozen probe store of the same" in line
    # an older probe store that records no SHA-256: paired by label, and said
    import zarr

    g = zarr.open_group(str(other), mode="r+")
    cfg = json.loads(g.attrs["config"])
    for c in cfg["checkpoints"]:
        c.pop("sha256", None)
    g.attrs["config"] = json.dumps(cfg)
    assert main(["analyze", str(store), "--out", str(rep), "--n-boot", "0", "--no-figures", "--noise-store",
                 str(other)]) == 0
    s = json.loads((rep / "summary.json").read_text())
    assert s["b_noise"]["per_checkpoint"]["early"]["by"] == "label"
    assert any("paired by label only" in n and "records no SHA-256" in n for n in s["notes"])


# -- 4. flags out of range: one line, exit 2, nothing written -------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--eval-examples", "100000"], "--eval-examples 100000 is more than the 1438 training examples of 'digits'"),
    (["--budget-tokens", "256"], "--budget-tokens needs a language-modelling task"),
    (["--batch-sizes", "16"], "one batch size (16) gives nothing to compare"),
    (["--evals", "0"], "--evals must be an integer >= 1"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--diverge-factor", "1"], "--diverge-factor must be > 1"),
    (["--diverge-factor", "nan"], "--diverge-factor must be a finite number"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--momentum", "-0.5"], "--momentum must be >= 0"),
    (["--momentum", "1"], "--momentum must be below 1"),
    (["--batch-sizes", "0,16"], "batch sizes must be positive integers"),
    (["--batch-sizes=-4,16"], "batch sizes must be positive integers"),
    (["--batch-sizes", "4,16,4"], "batch sizes repeat"),
    (["--eval-examples", "0"], "--eval-examples must be an integer >= 1"),
])
def test_bad_cbs_flags_are_one_line_and_write_nothing(ckpts, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.zarr"
    args = _cbs(ckpts, out, *extra)
    if "--budget-tokens" in extra:
        i = args.index("--budget")
        del args[i:i + 2]
    assert main(args) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_non_integer_batch_sizes_from_python_are_refused(ckpts):
    from gradlab.cbs.resolve import resolve_cbs
    from gradlab.errors import UsageError

    with pytest.raises(UsageError, match="batch sizes must be positive integers"):  # int(4.5) was 4, silently
        resolve_cbs([str(ckpts["early"])], data="digits", batch_sizes=[4.5, 16], budget=64, seeds=1, n_evals=2)


@pytest.mark.parametrize("extra, message", [
    (["--target-loss=-1"], "--target-loss must be > 0"),
    (["--target-loss", "0"], "--target-loss must be > 0"),
    (["--target-loss", "nan"], "--target-loss must be a finite number"),
    (["--target-loss", "inf"], "--target-loss must be a finite number"),
    (["--epsilon", "inf"], "--epsilon must be a finite number > 0"),
])
def test_bad_analyze_cbs_flags_are_one_line(store, tmp_path, capsys, extra, message):
    rep = tmp_path / "rep"
    assert main(["analyze", str(store), "--out", str(rep), "--n-boot", "0", *extra]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (rep / "summary.json").exists()


# -- 5. argparse's own errors are one line too ------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["cbs", "--checkpoint", "x.pt", "--data", "digits", "--out", "o.zarr", "--budget", "10", "--budget-tokens",
      "20"], ["--budget-tokens", "not allowed with argument --budget", "give only one of them", "gradlab cbs --help"]),
    (["probe", "--protocol", "sideways"], ["invalid choice", "gradlab probe --help"]),
    (["cbs", "--checkpoint", "x.pt", "--data", "digits", "--out", "o.zarr", "--batch-sizes", "-4,16"],
     ["expected one argument", "attached with '='"]),
    ([], ["required: COMMAND"]),
])
def test_argparse_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert all(w in line for w in words), line
    assert captured.out == "" and not any(tmp_path.iterdir())


# -- 6. divergence at a low-loss checkpoint ---------------------------------------------------------------------


def test_divergence_rule_has_the_zero_output_floor():
    from gradlab.cbs.engine import _diverged

    train = np.array([[0.02, 0.25, 0.1], [0.02, 30.0, 40.0], [0.02, 0.1, np.inf], [2.0, 25.0, 1.0]])
    steps = [0, 4, 8]
    assert list(_diverged(train, steps, 10.0, math.log(10))) == [-1, 4, 8, 4]
    assert list(_diverged(train, steps, 10.0, None)) == [4, 4, 8, 4]  # factor × the start alone


def test_low_loss_checkpoint_keeps_healthy_branches_and_flags_blow_ups(tmp_path):
    """From an Adam checkpoint at training loss ~0.03, Adam branches restarted at 3× its rate wander to ~0.4 and
    come back (healthy: 10× the checkpoint's loss flagged them), while 1000× the rate blows up (≥ 19 nats)."""
    from gradlab.store import open_store

    ck = make_low_loss_checkpoint(tmp_path)
    out = tmp_path / "adam.zarr"
    assert main(["cbs", "--checkpoint", str(ck), "--data", "digits", "--batch-sizes", "4,16", "--budget", "256",
                 "--seeds", "2", "--evals", "8", "--eval-examples", "512", "--lr-factors", "3,1000",
                 "--out", str(out), "--no-progress"]) == 0
    ds = open_store(out, kind="cbs")
    tr, div = ds.train_loss.values[0], ds.diverged_step.values[0]  # (M, F, R, J), (M, F, R)
    start = float(tr[0, 0, 0, 0])
    assert start < 0.05
    assert ds.attrs["diverge_reference"] == pytest.approx(math.log(10), rel=1e-6)
    assert "10× the checkpoint's and 2.303 (the loss of the zero output)" in ds.diverged_step.attrs["long_name"]
    healthy = tr[:, 0]  # factor 3
    assert (div[:, 0] == -1).all() and np.isfinite(healthy).all()
    assert healthy.max() > 10 * start  # the old rule (10 × the checkpoint's loss) flagged these
    assert healthy[..., -1].max() < 0.5  # and they did not blow up
    assert (div[:, 1] >= 0).all() and np.nanmax(tr[:, 1]) > 10 * math.log(10) / 2


def test_monitor_identity_needs_a_run_key_not_just_the_reduction():
    """Every monitor records its reduction: a match on that alone is not an identity check."""
    from gradlab.analysis.cbs import monitor_identity

    ident = {"run": "bs128_lr0.1_seed0_sgd", "seed": 0, "batch_size": 128, "lr": 0.1, "optimizer": "sgd",
             "reduction": "mean"}
    assert monitor_identity(ident, {"reduction": "mean", "every": 1})[0] is None
    assert monitor_identity(ident, {"reduction": "sum"})[0] is False
    assert monitor_identity(ident, {**ident, "every": 1})[0] is True
    assert monitor_identity(ident, {**ident, "seed": 1})[0] is False
    assert monitor_identity({}, ident)[0] is None
