"""``gradlab analyze`` on a sharpness store writes report.html and PNG + SVG figures with captions, like the probe,
monitor and cbs stores (it wrote PNGs only, no report, no SVG)."""

from __future__ import annotations

import json
import re

import numpy as np

from gradlab.cli import main
from test_curv_analysis import _synthetic


def _store(path):
    ds = _synthetic(noise=0.05, seed=1)
    C = ds.sizes["checkpoint"]
    m = np.array([8, 32])
    rng = np.random.default_rng(0)
    lam = ds["lambda_max"].values
    ds["minibatch_lambda_max"] = (("checkpoint", "batch_size", "trial"),
                                  lam[:, None, None] * (1 + 2 / m[None, :, None]) + 0.01 * rng.random((C, 2, 3)),
                                  {"long_name": "mini-batch lambda_max", "units": "loss / parameter^2"})
    ds["minibatch_lambda_full"] = (("checkpoint",), lam, {"long_name": "extrapolated lambda_max",
                                                          "units": "loss / parameter^2"})
    ds["minibatch_slope"] = (("checkpoint",), 2 * lam, {"long_name": "slope", "units": "loss / parameter^2"})
    alpha = np.linspace(-1, 2, 7)
    for split in ("train", "test"):
        ds[f"interp_{split}_loss"] = (("alpha",), 0.1 + (alpha - 0.5) ** 2, {"long_name": f"{split} loss",
                                                                             "units": "loss"})
        ds[f"interp_{split}_accuracy"] = (("alpha",), np.linspace(0.5, 0.9, 7), {"long_name": f"{split} accuracy",
                                                                                 "units": "1"})
    ds = ds.assign_coords(batch_size=("batch_size", m, {"long_name": "mini-batch size m", "units": "examples"}),
                          alpha=("alpha", alpha, {"long_name": "interpolation coefficient alpha", "units": "1"}))
    ds = ds.assign_coords(example=("example", np.arange(256)))
    ds.attrs["gradlab_store"] = "sharpness"
    for name in list(ds.variables):
        ds[name].encoding.clear()
        if ds[name].dtype.kind in "US":  # as gradlab.store writes strings (variable-length)
            ds[name] = ds[name].astype(object)
    ds.to_zarr(path, zarr_format=3, consolidated=False, mode="w")
    return path


def test_sharpness_analyze_writes_report_and_svg_figures_with_captions(tmp_path, capsys):
    store = _store(tmp_path / "sharp.zarr")
    out = tmp_path / "an"
    assert main(["analyze", str(store), "--out", str(out), "--n-boot", "20"]) == 0
    assert "report.html" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    stems = ["sharpness_vs_batch_size", "interpolation", *(f"minibatch_lambda_{c}" for c in range(12))]
    for stem in stems:
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").stat().st_size > 0, stem
    sharp = summary["sharpness"]
    assert sharp["figure_layout_problems"] == {}, sharp["figure_layout_problems"]
    assert set(sharp["figure_captions"]) == {f"{s}.png" for s in stems}
    assert all(len(c) > 60 for c in sharp["figure_captions"].values()), sharp["figure_captions"]
    page = (out / "report.html").read_text()
    assert page.count("<figcaption><b>Figure") == len(stems)
    for stem in stems:
        assert f'src="{stem}.png"' in page
    text = re.sub(r"<[^>]+>", " ", page)
    assert "λ_max (Lanczos)" in text and "∝ train_batch_size^b" in text and "nan" not in text.split()
    # no figures asked for: none drawn, no report
    bare = tmp_path / "bare"
    assert main(["analyze", str(store), "--out", str(bare), "--n-boot", "20", "--no-figures"]) == 0
    assert not list(bare.glob("*.png")) and not (bare / "report.html").exists()
