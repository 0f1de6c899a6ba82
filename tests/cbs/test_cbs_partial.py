"""`gradlab analyze` on a cbs store whose run was interrupted (some (checkpoint, batch size) units not computed):
the estimates use the computed batch sizes only and say they are provisional; the curves figure names the loss
analysed; refused flags leave no report folder behind (and never delete an earlier one)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from cbs_cases import cbs_argv, make_checkpoints
from gradlab.cli import main

GRID = ["--data", "digits", "--batch-sizes", "4,16,64", "--budget", "256", "--seeds", "5", "--evals", "4",
        "--eval-examples", "256", "--no-progress"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ck"))


def _cbs(ckpts, out, *extra):
    return cbs_argv(ckpts, GRID, out, *extra)


@pytest.fixture(scope="module")
def partial(ckpts, tmp_path_factory):
    """Interrupted after 5 of 6 units (Ctrl-C in the 6th): every batch size of 'early' and 4, 16 of 'late' are done,
    (late, 64) is not."""
    from gradlab.cbs.job import CbsJob
    from gradlab.store import open_store

    out = tmp_path_factory.mktemp("p") / "cbs.zarr"
    real, calls = CbsJob.compute, {"n": 0}

    def flaky(self, state, unit, ctx):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, state, unit, ctx)

    mp = pytest.MonkeyPatch()
    mp.setattr(CbsJob, "compute", flaky)
    try:
        assert main(_cbs(ckpts, out)) == 130
    finally:
        mp.undo()
    done = np.asarray(open_store(out, kind="cbs").done.values)
    assert done.tolist() == [[True, True, True], [True, True, False]]
    return out


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), err
    return lines[0]


# -- 1. an interrupted store: provisional estimates from the computed batch sizes ------------------------------


def test_interrupted_store_gives_provisional_estimates_until_resumed(ckpts, partial, tmp_path, capsys):
    """The missing (late, 64) unit counted as 'beyond tolerance': late's B_crit read 16 [16, 16] as if final (and
    with 16 missing too, 4 [4, 4]).  Now the estimate uses the computed batch sizes: with every one within ε it is
    only a lower bound, B_crit ≥ 16, marked provisional in summary.json and the printed line; after --resume the
    store is complete and the same analysis is final."""
    store = tmp_path / "cbs.zarr"
    shutil.copytree(partial, store)
    rep = tmp_path / "rep"
    assert main(["analyze", str(store), "--out", str(rep), "--n-boot", "99", "--epsilon", "1000"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((rep / "summary.json").read_text())
    assert s["complete"] is False and s["units_done"] == 5 and s["units_total"] == 6
    assert s["missing_units"] == [{"checkpoint": "late", "batch_size": 64}]
    assert "late: batch size 64 not computed yet (resume the store): missing" in s["notes"]
    assert not any("diverged" in n for n in s["notes"])  # the unit not done is no diverged branch
    late, early = s["checkpoints"]["late"], s["checkpoints"]["early"]
    b = late["branching"]
    assert b["complete"] is False and b["missing_batch_sizes"] == [64.0] and b["lower_bound"] is True
    assert b["batch_sizes_used"] == [4.0, 16.0] and not b["censored"]
    assert b["b_crit"]["value"] == 16 and b["b_crit"]["high"] == "inf"
    assert b["b_crit"]["note"].startswith("provisional, a lower bound") and "B_crit ≥ 16" in b["b_crit"]["note"]
    assert b["ratio"][2] is None and b["n_seeds"] == [5, 5, 0]
    t = late["tradeoff"]
    assert t["complete"] is False and t["missing_batch_sizes"] == [64.0]
    assert len(t["steps"]) == 3 and t["steps"][2] is None and t["reached"][2] is False
    assert "fitted on batch size(s) 4, 16 only" in t["b_crit"]["note"]
    assert early["complete"] is True and early["branching"]["complete"] is True
    assert s["early_vs_late"]["branching"]["claim"].startswith("not assessed")
    line = next(ln for ln in printed.splitlines() if ln.strip().startswith("late:"))
    assert "B_crit branching (ε = 1000) ≥ 16 [" in line and "provisional, a lower bound" in line
    assert "64 not computed yet" in line and "(grid: ≥ 16, the largest computed batch size so far)" in line
    assert "incomplete: 5 of 6 units computed" in printed.splitlines()[0]
    captions = json.loads((rep / "captions.json").read_text())
    assert "late: provisional, batch size(s) 64 not computed yet" in captions["cbs_branching"]
    # resumed: complete, the lower bound gives way to the final (censored) estimate; early is unchanged
    assert main(_cbs(ckpts, store, "--resume")) == 0
    rep2 = tmp_path / "rep2"
    assert main(["analyze", str(store), "--out", str(rep2), "--n-boot", "99", "--epsilon", "1000"]) == 0
    printed = capsys.readouterr().out
    s2 = json.loads((rep2 / "summary.json").read_text())
    assert s2["complete"] is True and s2["missing_units"] == []
    b2 = s2["checkpoints"]["late"]["branching"]
    assert b2["complete"] is True and b2["censored"] and b2["b_crit"]["value"] == 64
    assert s2["checkpoints"]["early"]["branching"]["b_crit"] == early["branching"]["b_crit"]
    assert "provisional" not in printed and "incomplete" not in printed


def _final(bs, r, R=6, seed=0):
    """Losses after the budget (M, R) whose mean over seeds has relative excess ``r`` over the smallest batch."""
    rng = np.random.default_rng(seed)
    noise = 1 + 0.001 * rng.standard_normal((len(bs), R))
    return (1.0 + np.asarray(r, dtype=float))[:, None] * noise


def test_branching_uses_the_computed_run_from_the_smallest_batch_size():
    from gradlab.analysis.cbs import branching_section
    from gradlab.cbs.estimators import branching_estimate

    bs = np.array([4.0, 16.0, 64.0, 256.0])
    rng = np.random.default_rng(0)
    # r crosses ε between 4 and 16: missing 64 and 256 cannot move the point estimate
    final = _final(bs, [0, 0.2, 0.5, 0.9])
    full = branching_estimate(final, bs, 0.05, n_boot=199, rng=np.random.default_rng(1))
    done = np.array([True, True, False, False])
    d = branching_section(np.where(done[:, None], final, np.nan), bs, done, 0.05, n_boot=199, rng=rng)
    assert d["complete"] is False and d["lower_bound"] is False and d["missing_batch_sizes"] == [64.0, 256.0]
    assert d["b_crit"]["value"] == pytest.approx(full.b_crit.value) and 4 < d["b_crit"]["value"] < 16
    assert d["b_crit"]["note"].startswith("provisional: batch size(s) 64, 256 not computed yet")
    # 16 missing: the old rule read the hole as 'beyond tolerance', B_crit 4 [4, 4]; now no estimate yet
    done = np.array([True, False, True, True])
    d = branching_section(np.where(done[:, None], _final(bs, [0, 0.01, 0.02, 0.5]), np.nan), bs, done, 0.05,
                          n_boot=199, rng=rng)
    assert d["b_crit"]["value"] is None and "batch size 16, the next after the smallest, is not computed yet" in (
        d["b_crit"]["note"])
    assert d["ratio"][1] is None and d["ratio"][2] == pytest.approx(0.02, abs=0.005)  # computed ones still shown
    # every computed batch size within ε: a lower bound, B_crit ≥ 64 (upper end +∞), not a crossing at 64
    done = np.array([True, True, True, False])
    d = branching_section(np.where(done[:, None], _final(bs, [0, 0.01, 0.02, 0.5]), np.nan), bs, done, 0.05,
                          n_boot=199, rng=rng)
    assert d["lower_bound"] is True and d["b_crit"]["value"] == 64 and d["b_crit"]["high"] == "inf"
    assert "B_crit ≥ 64" in d["b_crit"]["note"]
    # the reference itself missing
    done = np.array([False, True, True, True])
    d = branching_section(np.where(done[:, None], _final(bs, [0, 0.01, 0.02, 0.5]), np.nan), bs, done, 0.05,
                          n_boot=0, rng=rng)
    assert d["b_crit"]["value"] is None and "batch size 4, the reference, is not computed yet" in d["b_crit"]["note"]
    # a diverged batch size (computed, every branch NaN) still counts as beyond tolerance, as before
    final = _final(bs, [0, 0.01, 0.02, 0.03])
    final[2] = np.nan
    d = branching_section(final, bs, np.ones(4, dtype=bool), 0.05, n_boot=0, rng=rng)
    assert d["complete"] is True and d["b_crit"]["value"] == pytest.approx(16) and not d["lower_bound"]


def test_tradeoff_fits_the_computed_batch_sizes_only():
    import xarray as xr

    from gradlab.analysis.cbs import analyze_checkpoint

    bs = np.array([4.0, 16.0, 64.0])
    J, R = 9, 5
    steps = np.stack([np.round(np.linspace(0, 256 / m, J)) for m in bs])
    ds = xr.Dataset(coords={"batch_size": bs, "lr_factor": [1.0], "checkpoint": ["c"], "checkpoint_epoch": [1.0]})
    ds["steps"] = (("batch_size", "eval"), steps)
    ds["done"] = (("checkpoint", "batch_size"), np.array([[True, True, False]]))
    S_min, E_min = 8.0, 64.0  # S(m) = S_min + E_min/m steps to halve the loss
    rate = np.log(2) / (S_min + E_min / bs)
    L = np.exp(-rate[:, None] * steps)[None, :, None, None, :] * np.ones((1, 3, 1, R, J))
    L = L * (1 + 1e-4 * np.random.default_rng(0).standard_normal(L.shape))
    L[0, 2] = np.nan  # not computed
    out = analyze_checkpoint(ds, 0, L, epsilon=0.05, target_loss=0.5, target_fraction=0.5, n_boot=99,
                             rng=np.random.default_rng(0))
    t = out["tradeoff"]
    assert out["complete"] is False and t["complete"] is False and t["missing_batch_sizes"] == [64.0]
    assert t["steps"][2] is None and t["reached"] == [True, True, False]
    assert t["b_crit"]["value"] == pytest.approx(E_min / S_min, rel=0.05)
    assert t["notes"][0] == ("provisional: batch size(s) 64 not computed yet: fitted on batch size(s) 4, 16 only "
                             "(resume the store)")
    assert not any("no curve" in n for n in t["notes"])  # not mistaken for a batch size whose branches diverged


# -- 3. the curves figure names the loss analysed -------------------------------------------------------------


@pytest.mark.parametrize("loss, words", [("train_loss", ("training loss", "Training loss")),
                                         ("test_loss", ("held-out loss", "Held-out loss"))])
def test_curves_figure_labels_the_loss_analysed(partial, tmp_path, monkeypatch, loss, words):
    """--cbs-loss train_loss drew training-loss curves under the y-label "held-out loss", and the captions said
    held-out too."""
    import gradlab.figures.cbs as fig_cbs

    labels = []
    real = fig_cbs.plot_curves

    def spy(*args, **kwargs):
        ax = real(*args, **kwargs)
        labels.append(ax.get_ylabel())
        return ax

    monkeypatch.setattr(fig_cbs, "plot_curves", spy)
    rep = tmp_path / "rep"
    assert main(["analyze", str(partial), "--out", str(rep), "--n-boot", "0", "--cbs-loss", loss]) == 0
    assert len(labels) == 2 and all(lab.replace("\n", " ").startswith(words[0]) for lab in labels), labels
    captions = json.loads((rep / "captions.json").read_text())
    assert captions["cbs_curves"].startswith(words[1])
    assert f"of the {words[0]} after the budget" in captions["cbs_branching"]
    other = "held-out" if loss == "train_loss" else "training loss"
    assert other not in captions["cbs_curves"].lower() and other not in captions["cbs_branching"].lower()


# -- 4. refused flags leave no report folder behind -----------------------------------------------------------


@pytest.mark.parametrize("extra", [["--target-loss=-1"], ["--epsilon", "0"], ["--target-loss", "nan"]])
def test_refused_cbs_flags_make_no_report_folder(partial, tmp_path, capsys, extra):
    rep = tmp_path / "rep"
    assert main(["analyze", str(partial), "--out", str(rep), "--n-boot", "0", *extra]) == 2
    _one_error_line(capsys.readouterr().err)
    assert not rep.exists()


def test_a_refusal_keeps_an_earlier_report_and_an_empty_folder_as_they_were(partial, tmp_path, capsys):
    rep = tmp_path / "rep"
    assert main(["analyze", str(partial), "--out", str(rep), "--n-boot", "0", "--no-figures"]) == 0
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    assert main(["analyze", str(partial), "--out", str(rep), "--n-boot", "0", "--target-loss=-1"]) == 2
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["analyze", str(partial), "--out", str(empty), "--n-boot", "0", "--epsilon", "-1"]) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # no marker left in the user's folder


def test_a_refusal_after_the_folder_is_claimed_removes_only_what_this_call_made(partial, tmp_path, monkeypatch,
                                                                                 capsys):
    """A refusal that needs the analysis (here: a stand-in raising after it wrote a figure) removes the folder this
    call made, and leaves an earlier report's files in place."""
    import gradlab.analysis.cbs as analysis_cbs
    from gradlab.errors import UsageError

    def refuses(path, out, **kwargs):
        (out / "cbs_curves.png").write_bytes(b"partial")
        raise UsageError("refused after the analysis started")

    monkeypatch.setattr(analysis_cbs, "analyze_cbs", refuses)
    fresh = tmp_path / "fresh"
    assert main(["analyze", str(partial), "--out", str(fresh), "--n-boot", "0"]) == 2
    assert "refused after the analysis started" in _one_error_line(capsys.readouterr().err)
    assert not fresh.exists()
    monkeypatch.undo()
    old = tmp_path / "old"
    assert main(["analyze", str(partial), "--out", str(old), "--n-boot", "0", "--no-figures"]) == 0
    monkeypatch.setattr(analysis_cbs, "analyze_cbs", refuses)
    assert main(["analyze", str(partial), "--out", str(old), "--n-boot", "0"]) == 2
    assert (old / "summary.json").exists() and (old / ".gradlab-analysis").exists()


def test_refused_probe_flags_make_no_report_folder(ckpts, tmp_path, capsys):
    probe = tmp_path / "p.zarr"
    assert main(["probe", "--checkpoint", str(ckpts["early"]), "--data", "digits", "--batch-sizes", "1,8",
                 "--budget", "8", "--trials", "2", "--out", str(probe), "--no-progress"]) == 0
    capsys.readouterr()
    rep = tmp_path / "rep"
    assert main(["analyze", str(probe), "--out", str(rep), "--ref-batch-size", "3", "--n-boot", "0"]) == 2
    assert "--ref-batch-size 3 is not a batch size" in _one_error_line(capsys.readouterr().err)
    assert not rep.exists()
    assert main(["analyze", str(probe), "--out", str(rep), "--n-boot", "-1"]) == 2
    assert not rep.exists()


def test_no_default_target_when_the_smallest_batch_size_is_not_computed():
    import xarray as xr

    from gradlab.analysis.cbs import analyze_checkpoint

    bs = np.array([4.0, 16.0])
    steps = np.stack([np.round(np.linspace(0, 64 / m, 3)) for m in bs])
    ds = xr.Dataset(coords={"batch_size": bs, "lr_factor": [1.0], "checkpoint": ["c"], "checkpoint_epoch": [1.0]})
    ds["steps"] = (("batch_size", "eval"), steps)
    ds["done"] = (("checkpoint", "batch_size"), np.array([[False, True]]))
    L = np.full((1, 2, 1, 3, 3), np.nan)
    L[0, 1] = [1.0, 0.8, 0.6]
    out = analyze_checkpoint(ds, 0, L, epsilon=0.05, target_loss=None, target_fraction=0.5, n_boot=0,
                             rng=np.random.default_rng(0))
    assert out["tradeoff"] is None and math.isnan(out["target_loss"])
    assert "the smallest batch size 4 is not computed yet" in out["tradeoff_not_estimated"]
    assert out["branching"]["b_crit"]["value"] is None
