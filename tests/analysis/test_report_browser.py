"""Figures and the HTML report fit for a paper (issue 15 item 8): captions that say how to read each figure, no
overlapping or escaping text (matplotlib's tight bounding boxes), and the report rendered in a real headless
Chromium at a fixed width with nothing overflowing and every image readable at its displayed size.

Chromium comes from Debian's packages (``.ci/run`` installs it with apt-get); where it is absent locally the
browser test is skipped with that reason -- in CI (``CI`` set) its absence is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gradlab.analysis.compare import Change
from gradlab.analysis.interval import Estimate
from gradlab.analysis.run import analyze_store
from gradlab.analysis.table import fit_rows

CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const out = [];
  const W = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > W + 1)
    out.push('the page scrolls sideways: ' + document.documentElement.scrollWidth + ' > ' + W);
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > W + 1) out.push('<' + el.tagName + '> overflows: right edge ' + Math.round(r.right));
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX === 'hidden')
      out.push('<' + el.tagName + '> clips its content');
  }
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) out.push('image not loaded: ' + img.getAttribute('src'));
    else if (img.width < 0.75 * img.naturalWidth)
      out.push('image shrunk: ' + img.getAttribute('src') + ' shown ' + img.width + ' of ' + img.naturalWidth + ' px');
    const cap = img.parentElement.querySelector('figcaption');
    if (!cap || cap.textContent.replace(/Figure \\d+\\./, '').trim().length < 40)
      out.push('no caption saying how to read ' + img.getAttribute('src'));
  }
  const pre = document.createElement('pre'); pre.id = 'gradlab-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)


def _sharpness_store(path: Path) -> Path:
    """A small sharpness store: three runs (m = 16, 64, 256) with an early and a late checkpoint, λ_max growing
    with m, mini-batch λ_max and an interpolation (every figure kind of a sharpness analysis)."""
    import numpy as np
    import xarray as xr

    m = np.repeat([16.0, 64.0, 256.0], 2)
    epoch = np.tile([2.0, 30.0], 3)
    lam = np.where(epoch == 30, 3.0 * m**0.4, 1.5 * m**0.2) * np.exp(0.05 * np.random.default_rng(0).standard_normal(6))
    sizes = np.array([8, 32])
    alpha = np.linspace(-1, 2, 7)
    c, u = "checkpoint", "loss / parameter^2"
    data = {"lambda_max": ((c,), lam, {"long_name": "largest Hessian eigenvalue", "units": u}),
            "train_loss": ((c,), np.full(6, 0.1), {"long_name": "train loss", "units": "loss"}),
            "test_loss": ((c,), 0.1 + 0.01 * lam, {"long_name": "test loss", "units": "loss"}),
            "done": ((c,), np.ones(6, dtype=bool), {"long_name": "done", "units": "1"}),
            "minibatch_lambda_max": ((c, "batch_size", "trial"), lam[:, None, None] * (1 + 2 / sizes[None, :, None])
                                     * np.linspace(0.98, 1.02, 3), {"long_name": "mini-batch lambda_max", "units": u}),
            "minibatch_lambda_full": ((c,), lam, {"long_name": "extrapolated lambda_max", "units": u}),
            "minibatch_slope": ((c,), 2 * lam, {"long_name": "slope", "units": u})}
    for split in ("train", "test"):
        data[f"interp_{split}_loss"] = (("alpha",), 0.1 + (alpha - 0.5) ** 2, {"long_name": f"{split} loss",
                                                                               "units": "loss"})
        data[f"interp_{split}_accuracy"] = (("alpha",), np.linspace(0.5, 0.9, 7),
                                            {"long_name": f"{split} accuracy", "units": "1"})
    ds = xr.Dataset(data, coords={
        c: np.array([f"m{int(a)}-e{int(b)}" for a, b in zip(m, epoch)], dtype=object),
        "train_batch_size": ((c,), m, {"long_name": "training batch size m", "units": "examples"}),
        "train_lr": ((c,), np.full(6, 0.05), {"long_name": "learning rate", "units": "1"}),
        "checkpoint_epoch": ((c,), epoch, {"long_name": "epoch", "units": "epoch"}),
        "run_id": ((c,), np.array([f"m={int(a)}" for a in m], dtype=object)),
        "train_optimizer": ((c,), np.array(["sgd"] * 6, dtype=object)),
        "batch_size": ("batch_size", sizes, {"long_name": "mini-batch size m", "units": "examples"}),
        "alpha": ("alpha", alpha, {"long_name": "interpolation coefficient alpha", "units": "1"}),
        "example": ("example", np.arange(256))}, attrs={"gradlab_store": "sharpness"})
    ds.to_zarr(path, zarr_format=3, consolidated=False, mode="w")
    return path


@pytest.fixture(scope="module")
def reports(step_store, frozen_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    sharp = _sharpness_store(out / "sharp.zarr")
    return {name: (analyze_store(path, out_dir=out / name, n_boot=49, seed=0, write_store=False), out / name)
            for name, path in (("step", step_store[0]), ("frozen", frozen_store[0]), ("sharpness", sharp))}


@pytest.mark.parametrize("name", ["step", "frozen", "sharpness"])
def test_every_figure_has_a_caption_and_no_overlapping_text(reports, name):
    res, out = reports[name]
    if name == "sharpness":  # a sharpness store's figures are described in its own section
        res = res["sharpness"]
    assert res["figure_layout_problems"] == {}, res["figure_layout_problems"]
    pngs = [f for f in res["figures"] if f.endswith(".png")]
    assert pngs and all(len(res["figure_captions"][f]) > 60 for f in pngs)
    page = (out / "report.html").read_text()
    assert page.count("<figcaption><b>Figure") == len(pngs)
    assert "mean norm entering the power-law fit" not in page and "nan" not in re.sub(r"<[^>]+>", " ", page).split()


def test_table_and_changes_read_as_sentences():
    ch = Change("beta", "difference", "early", "late", 0.5, 0.4, Estimate(-0.096, -0.14, -0.05), True)
    assert ch.describe() == "beta fell by 0.096 [0.05, 0.14] (early → late)"
    # an interval that holds "no change" claims no direction (not "b_noise grew ×1 [0.93, 1.1]")
    flat = Change("b_noise", "ratio", "early", "late", 1.0, 1.0, Estimate(1.02, 0.93, 1.1), True)
    assert flat.describe() == "b_noise: no change distinguishable at 95% (ratio ×1 [0.93, 1.1], early → late)"
    inf = {"value": "inf", "low": "inf", "high": "inf", "level": 0.95, "note": None}
    res = {"checkpoints": {"c": {"power_law": {"x": {"beta": {"value": 0.5, "low": 0.4, "high": 0.6}, "p_beta_half": 1,
                                                     "sqrt_law_max_batch_size": None, "crossover": inf}}}}}
    rows = fit_rows(res)
    text = " ".join(" ".join(r) for r in rows)
    assert "inf" not in text and "nan" not in text
    assert "none within reach" in text and "√m range: none at this precision" in text


@pytest.mark.parametrize("name", ["step", "frozen", "sharpness"])
def test_report_in_headless_chromium(reports, name, tmp_path):
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it with apt-get install -y chromium")
        pytest.skip("chromium is not installed here (apt-get install -y chromium); CI runs this test")
    _, out = reports[name]
    page = out / "report-check.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK_JS + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1280,2000", "--virtual-time-budget=10000", "--allow-file-access-from-files"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    found = re.search(r'<pre id="gradlab-check">(.*?)</pre>', dom, re.S)
    assert found, "the check script did not run"
    problems = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
                          .replace("&quot;", '"'))
    assert problems == [], problems
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.stat().st_size > 10_000  # a fixed-width screenshot of the rendered page
