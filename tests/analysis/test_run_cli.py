"""`gradlab analyze` end to end on synthetic stores: table, JSON, analysis group, figures, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from gradlab.analysis.run import analyze_store
from gradlab.cli import main
from gradlab.synthetic import write_synthetic_store

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_analysis_package_imports_without_torch():
    code = ("import sys, gradlab.analysis, gradlab.analysis.run, gradlab.figures, gradlab.figures.norms, "
            "gradlab.figures.tails, gradlab.figures.weights, gradlab.synthetic, gradlab.cli.analyze; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env())


def test_frozen_store_estimates_cover_truth_and_group_is_written(frozen_store, tmp_path):
    """Estimates lie in their 95% intervals; the truth lies in the 99.9% intervals (20 intervals at once: at 95%
    one would miss in most stores -- the 95% calibration is the 200-seed coverage test's job)."""
    path, truth = frozen_store
    wide = analyze_store(path, out_dir=tmp_path / "wide", n_boot=1999, seed=1, figures=False, level=0.999,
                         write_store=False)
    res = analyze_store(path, out_dir=tmp_path / "out", n_boot=999, seed=1, figures=False)
    for i, c in enumerate(("early", "late")):
        for key in ("grad_sq_norm", "trace_cov", "b_noise"):
            e = res["checkpoints"][c]["noise_model"][key]
            assert e["low"] <= e["value"] <= e["high"]
            w = wide["checkpoints"][c]["noise_model"][key]
            assert w["low"] <= truth[key][i] <= w["high"], (c, key, w, truth[key][i])
        for m, t in wide["checkpoints"][c]["tails"].items():
            a = t["alpha_stable"]
            assert a["low"] <= 1.5 <= a["high"], (c, m, a)
    ratio = next(ch for ch in wide["comparison"] if ch["quantity"] == "b_noise")
    assert ratio["change"]["low"] <= 3.0 <= ratio["change"]["high"]  # B_noise 16 → 48
    assert not ratio["paired"]  # checkpoints draw independently
    ads = xr.open_zarr(path, group="analysis", consolidated=False)
    assert ads["b_noise_fit"].attrs["units"] == "examples"
    np.testing.assert_allclose(ads["b_noise_fit"].values, [res["checkpoints"][c]["noise_model"]["b_noise"]["value"]
                                                          for c in ("early", "late")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["checkpoints"]["late"]["n_trials"] == 40


def test_cli_table_and_figures_labelled_from_attrs(step_store, tmp_path, capsys):
    path, _ = step_store
    out = tmp_path / "fig"
    assert main(["analyze", str(path), "--out", str(out), "--n-boot", "99"]) == 0
    text = capsys.readouterr().out
    assert "β (grad_norm)" in text and "late/early" in text and "95% interval" in text
    for stem in ("norm_vs_batch_size", "normalised_std", "norm_ridge", "entry_tails", "tail_index",
                 "weights_per_layer"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "norm_vs_batch_size.png" in html and "β (grad_norm)" in html
    svg = (out / "weights_per_layer.svg").read_text()
    assert "distance from init" in svg and "cosine to init" in svg  # labels from the store's long_name attrs


def test_plot_labels_come_from_attrs(step_store):
    from matplotlib.figure import Figure

    from gradlab.figures.norms import plot_normalised_std

    path, _ = step_store
    ads = xr.open_zarr(path, group="analysis", consolidated=False).load()
    ads["grad_norm_std_normalised"].attrs.update(long_name="custom label", units="furlong")
    ads["batch_size"].attrs.update(long_name="m here", units="ex")
    ax = plot_normalised_std(ads, Figure().subplots())
    assert ax.get_ylabel() == "custom label [furlong]" and ax.get_xlabel() == "m here [ex]"


def test_json_output_is_the_only_stdout(step_store, tmp_path, capsys):
    path, _ = step_store
    assert main(["analyze", str(path), "--json", "--no-figures", "--n-boot", "0", "--out", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["protocol"] == "step" and data["checkpoints"]["early"]["power_law"]["grad_norm"]["beta"]["value"] \
        == pytest.approx(0.0, abs=1e-9)  # sum reduction at lr → 0: ‖S‖ = ‖Σᵢ gᵢ‖ does not depend on m


def test_not_a_gradlab_store_exits_2(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["analyze", str(tmp_path / "plain")]) == 2
    assert "not a zarr v3 store" in capsys.readouterr().err
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(tmp_path / "foreign.zarr", zarr_format=3, consolidated=False)
    assert main(["analyze", str(tmp_path / "foreign.zarr")]) == 2
    assert "not a gradlab store" in capsys.readouterr().err


def test_bad_flags_exit_2(step_store, capsys):
    path, _ = step_store
    assert main(["analyze", str(path), "--ref-batch-size", "3", "--no-figures"]) == 2
    assert "choose one of 1, 2, 4, 8, 16" in capsys.readouterr().err
    assert main(["analyze", str(path), "--n-boot", "-1", "--no-figures"]) == 2


def test_unfinished_store_analyses_done_units_and_says_what_is_missing(tmp_path, capsys):
    path = tmp_path / "part.zarr"
    write_synthetic_store(path, trials=12, done_trials=6, batch_sizes=(1, 2, 4, 8), budget=8, pool_size=64)
    assert main(["analyze", str(path), "--no-figures", "--n-boot", "99", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "checkpoint 'late': 6 of 12 trials not done (6..11)" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["missing"] == ["checkpoint 'late': 6 of 12 trials not done (6..11)"]
    assert summary["checkpoints"]["late"]["n_trials"] == 6


def test_store_with_no_done_unit_exits_2(tmp_path, capsys):
    path = tmp_path / "none.zarr"
    write_synthetic_store(path, checkpoints=("only",), trials=4, done_trials=0, batch_sizes=(1, 2), budget=2,
                          pool_size=16)
    assert main(["analyze", str(path), "--no-figures"]) == 2
    assert "no finished trial" in capsys.readouterr().err


def test_too_few_trials_give_nan_interval_and_a_note(tmp_path):
    path = tmp_path / "few.zarr"
    write_synthetic_store(path, trials=3, batch_sizes=(1, 2, 4), budget=4, pool_size=32)
    res = analyze_store(path, out_dir=tmp_path / "o", n_boot=99, figures=False)
    beta = res["checkpoints"]["early"]["power_law"]["minibatch_sum_rms"]["beta"]  # a frozen store: ‖S‖ is not fitted
    assert beta["low"] is None and beta["high"] is None and "only 3 trial" in beta["note"]
    assert any("only 3 trial" in n for n in res["notes"])


def test_cli_subprocess_json(step_store, tmp_path):
    path, _ = step_store
    proc = subprocess.run([sys.executable, "-m", "gradlab", "analyze", str(path), "--json", "--no-figures",
                           "--n-boot", "0", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), check=True)
    assert json.loads(proc.stdout)["gradlab_store"] == "probe"


def test_frozen_store_shows_only_what_it_measures(frozen_store, tmp_path):
    """Issue 15 item 3: a frozen store's ‖S‖ = c_m‖Σᵢgᵢ‖ is fixed by construction (β = −1 under mean reduction), the
    noise model is an identity at fixed θ (its lack of fit cannot fail), and S only rescales with m (one tail
    index): none of these is reported as a measurement, and the summary and report say why."""
    path, _ = frozen_store
    out = tmp_path / "f"
    res = analyze_store(path, out_dir=out, n_boot=99, seed=1, write_store=False)
    for c in res["checkpoints"].values():
        assert set(c["power_law"]) == {"minibatch_sum_rms"}
        lof = c["noise_model"]["lack_of_fit"]
        assert lof["p_value"] is None and "identity" in lof["note"]
        assert list(c["tails"]) == ["64"]  # the reference (largest) batch size only
    assert {"power law, crossover and histograms of ‖S‖", "lack of fit of the noise model",
            "tail indices per batch size", "normalised std of ‖S‖"} <= set(res["not_measured"])
    files = set(res["figures"])
    assert "norm_ridge.png" not in files and "norm_ridge_normalised.png" not in files
    assert "normalised_std.png" not in files and "tail_index.png" not in files
    html = (out / "report.html").read_text()
    assert "β (grad_norm)" not in html and "not shown: lack of fit of the noise model" in html
    assert "lack of fit χ²" not in html
    # issue 15 item 7: one headline estimate of ‖G‖², tr Σ and B_noise (the U-statistics), the fit labelled a check
    assert "U-statistic" in res["headline"] and "(headline)" in html and "B_noise (noise-law fit)" in html
    ds = xr.open_zarr(path, consolidated=False)
    for i, c in enumerate(("early", "late")):
        est = res["checkpoints"][c]["estimates"]
        for key in ("grad_sq_norm", "trace_cov", "b_noise"):
            assert est[key]["value"] == pytest.approx(float(ds[key].values[i]), rel=1e-10), (c, key)
            assert est[key]["low"] <= est[key]["value"] <= est[key]["high"]


def test_fit_table_marks_the_frozen_noise_law_fit_and_crossover_as_the_headline_again():
    """At fixed θ the partition means of ‖s_B‖² are an identity of the Gram matrix: the noise-law fit and the
    crossover of ‖s_B‖² repeat the U-statistic headline; the table says so rather than list them as evidence."""
    from gradlab.analysis.table import fit_rows

    e = {"value": 98.0, "low": 97.0, "high": 99.0, "note": None}
    lof = {"chi2": 1.0, "dof": 3, "p_value": 0.8, "note": None}
    pl = {"beta": e, "p_beta_half": 0.1, "sqrt_law_max_batch_size": 8, "crossover": e}
    c = {"estimates": {"grad_sq_norm": e, "trace_cov": e, "b_noise": e},
         "noise_model": {"grad_sq_norm": e, "trace_cov": e, "b_noise": e, "lack_of_fit": lof},
         "power_law": {"minibatch_sum_rms": pl}}
    rows = {r[1]: r[4] for r in fit_rows({"checkpoints": {"early": c}})}
    assert "consistency check, not independent evidence" in rows["B_noise (noise-law fit)"]
    assert "lack of fit" in rows["B_noise (noise-law fit)"]
    assert rows["crossover (minibatch_sum_rms)"].startswith("= B_noise (noise-law fit)")
    step = {"noise_model": c["noise_model"], "power_law": {"minibatch_sum_rms": pl}}  # no U-statistics: no remark
    rows = {r[1]: r[4] for r in fit_rows({"checkpoints": {"early": step}})}
    assert "consistency" not in rows["B_noise (noise-law fit)"] and rows["crossover (minibatch_sum_rms)"] == ""
