"""The recipe of CONTRIBUTING.md followed end to end: a per-trial quantity defined only here -- the cosine between
consecutive minibatch gradients -- written as one class, registered with one line, and checked with the two tests
every quantity needs (an analytic case and a float64 brute-force reference).  Registered, it appears in the probe
store (labelled from its declaration), in `gradlab analyze`'s summary and table, and in a captioned figure, with
nothing else touched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradlab.quantities import QUANTITIES, Output, TrialInputs, TrialQuantity

CBT = ("checkpoint", "batch_size", "trial")


class ConsecutiveCosine(TrialQuantity):
    """cos(s_k, s_{k+1}) averaged over consecutive minibatches k of the partition of a trial into blocks of m,
    s_k = Σ_{i∈B_k} gᵢ; from the Gram matrix: s_k·s_l = 1ᵀ K_{B_k B_l} 1.  NaN when N/m < 2.  (Scale-free, so the
    reduction does not matter.)"""

    outputs = (Output("consecutive_cosine", "mean cosine between consecutive minibatch gradients", "1", CBT),)
    protocols = ("frozen",)
    caption = "How aligned the gradients of consecutive minibatches are: 1 = same direction, 0 = orthogonal."

    def compute(self, inputs: TrialInputs) -> dict[str, np.ndarray]:
        k = inputs.gram.double()
        n = k.shape[0]
        out = np.full(len(inputs.batch_sizes), np.nan)
        for i, m in enumerate(inputs.batch_sizes):
            nb = n // m
            if nb < 2:
                continue
            p = k[: nb * m, : nb * m].reshape(nb, m, nb, m).sum(dim=(1, 3))  # s_k·s_l
            d = torch.sqrt(torch.clamp(torch.diagonal(p), min=0))
            out[i] = float((torch.diagonal(p, 1) / (d[:-1] * d[1:])).mean())
        return {"consecutive_cosine": out}


# ---- the two tests every quantity needs ---------------------------------------------------------------------


def test_analytic_case_equal_and_alternating_gradients():
    g = torch.tensor([[1.0, 2.0]] * 8, dtype=torch.float64)  # every example the same gradient: cos = 1
    out = ConsecutiveCosine().compute(TrialInputs((1, 2, 4, 8), "mean", 8, gram=g @ g.T))["consecutive_cosine"]
    np.testing.assert_allclose(out[:3], 1.0, rtol=0, atol=1e-15)
    assert np.isnan(out[3])  # one minibatch: no consecutive pair
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None]
    h = sign * torch.tensor([[3.0, -1.0]], dtype=torch.float64)  # blocks of 2 alternate in sign: cos = -1
    out = ConsecutiveCosine().compute(TrialInputs((2, 4), "sum", 8, gram=h @ h.T))["consecutive_cosine"]
    assert out[0] == pytest.approx(-1.0, abs=1e-15)
    assert np.isnan(out[1]) or abs(out[1]) <= 1.0 + 1e-15  # blocks of 4 sum to 0 here: cos undefined (NaN)


def test_matches_per_example_autograd_in_float64(registered, probe_store, checkpoint_model):
    import xarray as xr

    from gradlab.datasets import load_data

    ds = xr.open_zarr(probe_store, consolidated=False)
    net = checkpoint_model.double().eval()
    train = load_data("digits").train
    for t in range(ds.sizes["trial"]):
        idx = torch.as_tensor(ds.example_index.values[0, t])
        x, y = train.x[idx].double(), train.y[idx]
        grads = []
        for i in range(len(idx)):  # per-example gradients by autograd, one example at a time
            loss = F.cross_entropy(net(x[i:i + 1]), y[i:i + 1], reduction="sum")
            g = torch.autograd.grad(loss, list(net.parameters()))
            grads.append(torch.cat([gi.reshape(-1) for gi in g]))
        gmat = torch.stack(grads)
        for mi, m in enumerate(ds.batch_size.values):
            s = gmat.reshape(-1, int(m), gmat.shape[1]).sum(1)
            cos = F.cosine_similarity(s[:-1], s[1:], dim=1).mean().item() if len(s) > 1 else np.nan
            got = float(ds.consecutive_cosine.values[0, mi, t])
            if np.isnan(cos):
                assert np.isnan(got)
            else:
                assert got == pytest.approx(cos, rel=1e-12, abs=1e-14)


# ---- end to end: registered, it appears in the store, the analysis table and a labelled figure --------------


@pytest.fixture(scope="module")
def registered():
    QUANTITIES["consecutive_cosine"] = ConsecutiveCosine()  # the one registry line (here: for this module only)
    yield
    del QUANTITIES["consecutive_cosine"]


@pytest.fixture(scope="module")
def run_paths(tmp_path_factory):
    from tests.probe.probe_cases import make_run

    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def checkpoint_model(run_paths):
    from gradlab.checkpoint import build_model_from, load_checkpoint

    return build_model_from(load_checkpoint(run_paths["late"]))


@pytest.fixture(scope="module")
def probe_store(registered, run_paths, tmp_path_factory):
    from gradlab.cli import main

    out = tmp_path_factory.mktemp("probe") / "frozen.zarr"
    assert main(["probe", "--checkpoint", f"late={run_paths['late']}", "--checkpoint", f"early={run_paths['early']}",
                 "--data", "digits", "--protocol", "frozen", "--dtype", "float64", "--batch-sizes", "1,2,4,8,16",
                 "--budget", "16", "--trials", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def test_store_holds_the_quantity_labelled_from_its_declaration(probe_store):
    import xarray as xr

    da = xr.open_zarr(probe_store, consolidated=False)["consecutive_cosine"]
    assert da.dims == CBT and da.attrs["long_name"] == ConsecutiveCosine.outputs[0].long_name
    assert da.attrs["units"] == "1" and np.isfinite(da.values[:, :-1]).all() and np.isnan(da.values[:, -1]).all()


def test_analyze_tabulates_and_draws_it(probe_store, tmp_path, capsys):
    from gradlab.cli import main

    out = tmp_path / "report"
    assert main(["analyze", str(probe_store), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mean cosine between consecutive minibatch gradients (m=1)" in table
    summary = json.loads((out / "summary.json").read_text())
    q = summary["quantities"]["consecutive_cosine"]
    import xarray as xr

    stored = xr.open_zarr(probe_store, consolidated=False)["consecutive_cosine"].sel(checkpoint="late", batch_size=4)
    assert q["checkpoints"]["late"]["4"]["mean"] == pytest.approx(float(stored.mean()), rel=1e-12)
    assert q["checkpoints"]["late"]["4"]["n"] == 3
    assert (out / "quantity_consecutive_cosine.png").exists()
    caption = summary["figure_captions"]["quantity_consecutive_cosine.png"]
    assert caption.startswith(ConsecutiveCosine.caption) and "error bars" in caption
    assert caption in (out / "report.html").read_text()
    assert not summary["figure_layout_problems"]


def test_unregistered_quantity_is_absent(run_paths, tmp_path, monkeypatch):
    from gradlab.cli import main

    monkeypatch.delitem(QUANTITIES, "consecutive_cosine", raising=False)

    out = tmp_path / "plain.zarr"
    assert main(["probe", "--checkpoint", str(run_paths["late"]), "--data", "digits", "--protocol", "frozen",
                 "--batch-sizes", "1,2", "--budget", "4", "--trials", "1", "--out", str(out), "--no-progress"]) == 0
    import xarray as xr

    assert "consecutive_cosine" not in xr.open_zarr(out, consolidated=False)
