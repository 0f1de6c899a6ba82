"""gradlab analyze on a monitor store: summary, figures, the comparison with a fixed-θ estimate; no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradlab.analysis.interval import Estimate
from gradlab.monitor import NoiseMonitor, open_monitor
from gradlab.task import cross_entropy
from .conftest import per_example_sums

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fixed_theta_store(tmp_path_factory):
    """200 monitored steps at a fixed θ (lr = 0) on batches of 16 drawn with replacement from 256 examples."""
    path = tmp_path_factory.mktemp("mon") / "run.zarr"
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(256, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, ema_decay=0.99, chunk_steps=50) as mon:
        for _ in range(200):
            idx = torch.randint(0, 256, (16,), generator=g)
            opt.zero_grad()
            mon.loss((x[idx], y[idx])).backward()
            opt.step()
    s1, s2 = per_example_sums(model, cross_entropy, (x, y))
    n = 256
    g2 = sum(s1.values()) / n**2
    tr = sum(s2.values()) / n - g2  # Σ with 1/n: the population the batches were drawn from
    return path, tr / g2


def test_monitored_b_noise_agrees_with_the_fixed_theta_value(fixed_theta_store):
    from gradlab.analysis.monitor import compare_with_probe, estimate_at

    path, b_true = fixed_theta_store
    ds = open_monitor(path).load()
    est = estimate_at(ds, "b_noise")
    assert est.contains(b_true), (est, b_true)
    cmp = compare_with_probe(ds, 199, Estimate(b_true, b_true * 0.99, b_true * 1.01))
    assert cmp["agree"] and cmp["step"] == 199


def test_gradlab_analyze_writes_summary_and_captioned_figures(fixed_theta_store, tmp_path, capsys):
    path, _ = fixed_theta_store
    from gradlab.cli import main

    out = tmp_path / "report"
    assert main(["analyze", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out  # a few readable lines (--json gives the summary)
    assert "200 recorded steps" in printed and "all: B_noise" in printed and "{" not in printed
    captions = json.loads((out / "captions.json").read_text())
    assert "for each parameter tensor" in captions["monitor_layers"] and "per-tensor" not in captions["monitor_noise"]
    html = (out / "report.html").read_text()
    assert "monitor_noise.png" in html and "monitor_layers.png" in html and "B_noise" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gradlab_store"] == "monitor" and summary["recorded_steps"] == 200
    assert summary["last"]["all"]["b_noise"]["value"] > 0
    for stem in ("monitor_noise", "monitor_layers"):
        assert (out / f"{stem}.png").stat().st_size > 10_000
    assert "B_noise" in json.loads((out / "captions.json").read_text())["monitor_noise"]


def test_the_analysis_side_imports_no_torch():
    code = ("import sys, gradlab.analysis.monitor, gradlab.figures.monitor, gradlab.monitor.estimators; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   timeout=120)


def test_a_store_without_any_estimate_draws_labelled_empty_panels(tmp_path, caplog):
    """Every step missing (a loss computed outside the monitor): the figures say there is nothing to draw, and
    matplotlib warns of nothing."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch import nn

    from gradlab.cli import main
    from gradlab.monitor import NoiseMonitor

    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["analyze", str(tmp_path / "m.zarr"), "--out", str(tmp_path / "r")]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["last"]["all"]["b_noise"]["note"].startswith("no estimate")
