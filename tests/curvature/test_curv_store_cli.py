"""`gradlab sharpness` end to end on real digits checkpoints: the store, its numbers, resume, and bad input."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from curv_cases import dense_hessian, tiny_mlp, train_a_bit, write_checkpoint

from gradlab.checkpoint import Recipe, build_model_from, load_checkpoint, save_checkpoint
from gradlab.cli import main
from gradlab.curvature.evaluate import evaluate

WIDTHS = (8,)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("ckpts")
    x, y = digits.train.x, digits.train.y
    small = train_a_bit(tiny_mlp(widths=WIDTHS, seed=0), x, y, steps=40, lr=0.1, batch=8, seed=0)
    large = train_a_bit(tiny_mlp(widths=WIDTHS, seed=0), x, y, steps=10, lr=0.1, batch=256, seed=1)
    a = write_checkpoint(root / "small.pt", small, WIDTHS, epoch=3, batch_size=8, lr=0.1, tag="small")
    b = write_checkpoint(root / "large.pt", large, WIDTHS, epoch=3, batch_size=256, lr=0.1, tag="large")
    return a, b


BASE = ["--samples", "96", "--top-k", "2", "--hutchinson-probes", "4", "--eps", "1e-3,5e-4", "--lbfgs-iters", "3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, ckpts):
    out = tmp_path_factory.mktemp("stores") / "sharp.zarr"
    a, b = ckpts
    rc = main(["sharpness", "--checkpoint", str(a), "--checkpoint", str(b), *BASE, "--subspace-dim", "3",
               "--minibatch-sizes", "16,48", "--minibatch-trials", "2", "--interpolate", str(a), str(b),
               "--alpha-points", "4", "--out", str(out)])
    assert rc == 0
    return out


def test_store_is_self_describing_with_config_and_provenance(store):
    ds = xr.open_zarr(store, consolidated=False)
    assert ds.attrs["gradlab_store"] == "sharpness"
    cfg = json.loads(ds.attrs["config"])
    assert cfg["samples"] == 96 and cfg["eps"] == [1e-3, 5e-4] and cfg["bn_mode"] == "eval"
    assert "versions" in json.loads(ds.attrs["provenance"])
    assert ds.attrs["bn_mode"].startswith("eval") and ds.attrs["interp_bn_buffers"] == "interpolated"
    for name in [*ds.data_vars, *ds.coords]:
        assert "long_name" in ds[name].attrs and "units" in ds[name].attrs, name
    assert list(ds["checkpoint"].values) == ["small", "large"]
    assert list(ds["train_batch_size"].values) == [8, 256]
    assert list(ds["space"].values) == ["full", "subspace"]
    assert bool(ds["done"].all()) and bool(ds["interp_done"].all())
    idx = ds["sample_index"].values
    assert idx.size == 96 and np.unique(idx).size == 96


def test_stored_curvature_matches_dense_hessian_on_the_recorded_sample(store, ckpts, digits):
    ds = xr.open_zarr(store, consolidated=False).load()
    idx = torch.from_numpy(ds["sample_index"].values)
    for c, path in enumerate(ckpts):
        model = build_model_from(load_checkpoint(path))
        h = dense_hessian(model, digits.train.x[idx], digits.train.y[idx])
        ev = np.sort(np.linalg.eigvalsh(h))[::-1]
        np.testing.assert_allclose(ds["eigenvalues"].values[c], ev[:2], rtol=1e-7)
        assert ds["lambda_max"].values[c] == ds["eigenvalues"].values[c, 0]
        assert ds["hessian_trace"].values[c] == pytest.approx(ds["trace_samples"].values[c].mean(), rel=1e-12)
        loss, acc = evaluate(model, digits.train.x, digits.train.y)
        assert ds["train_loss"].values[c] == loss and ds["train_accuracy"].values[c] == acc
        assert np.all(ds["eps_sharpness"].values[c] > 0)
        assert np.all(np.isfinite(ds["minibatch_lambda_max"].values[c]))
    # interpolation: alpha = -1, 0, 1, 2; the endpoints reproduce each checkpoint's train loss
    assert ds["interp_train_loss"].values[1] == ds["train_loss"].values[0]
    assert ds["interp_train_loss"].values[2] == ds["train_loss"].values[1]


def test_hutchpp_trace_in_the_store_matches_the_dense_trace(ckpts, digits, tmp_path):
    out = tmp_path / "hpp.zarr"
    opts = [o if o != "4" else "12" for o in BASE]  # a budget of 12 HVPs: sketch 4, remainder probes 4
    assert main(["sharpness", "--checkpoint", str(ckpts[1]), *opts, "--trace-estimator", "hutch++",
                 "--no-progress", "--out", str(out)]) == 0
    ds = xr.open_zarr(out, consolidated=False).load()
    assert ds.attrs["trace_estimator"] == "hutch++" and ds.sizes["probe"] == 4
    assert json.loads(ds.attrs["config"])["trace_estimator"] == "hutch++"
    idx = torch.from_numpy(ds["sample_index"].values)
    exact = float(np.trace(dense_hessian(build_model_from(load_checkpoint(ckpts[1])), digits.train.x[idx],
                                         digits.train.y[idx])))
    tr, se = float(ds["hessian_trace"].values[0]), float(ds["hessian_trace_stderr"].values[0])
    assert tr == pytest.approx(ds["trace_samples"].values[0].mean(), rel=1e-12)
    assert abs(tr - exact) <= 5 * se + 1e-9 * exact, (tr, se, exact)


def test_analysis_round_trip_from_the_store(store, tmp_path):
    from gradlab.analysis.curvature import analyze_store

    summary = analyze_store(store, out_dir=tmp_path / "an", n_boot=20, seed=0)
    json.dumps(summary, allow_nan=False)
    assert [c["checkpoint"] for c in summary["checkpoints"]] == ["small", "large"]
    ads = xr.open_zarr(tmp_path / "an" / "sharpness-analysis.zarr", consolidated=False)
    ds = xr.open_zarr(store, consolidated=False)
    np.testing.assert_allclose(ads["eos_ratio"].values, ds["lambda_max"].values * 0.1 / 2)
    np.testing.assert_allclose(ads["generalization_gap"].values, ds["test_loss"].values - ds["train_loss"].values)
    assert {p.rsplit("/", 1)[-1] for p in summary["figures"]} >= {"sharpness_vs_batch_size.png", "interpolation.png"}
    # two checkpoints: no power law is fitted, and the caption does not describe one
    assert "no power law is drawn" in summary["figure_captions"]["sharpness_vs_batch_size.png"]


def test_resume_recomputes_an_unfinished_checkpoint_to_the_same_bytes(store, ckpts, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    g = zarr.open_group(copy, mode="r+")
    before = {k: np.asarray(g[k][...]) for k in ("lambda_max", "eps_sharpness", "minibatch_lambda_max",
                                                 "trace_samples")}
    g["done"][1] = False
    g["lambda_max"][1] = np.nan
    g["eps_sharpness"][1] = np.nan
    a, b = ckpts
    argv = ["sharpness", "--checkpoint", str(a), "--checkpoint", str(b), *BASE, "--subspace-dim", "3",
            "--minibatch-sizes", "16,48", "--minibatch-trials", "2", "--interpolate", str(a), str(b),
            "--alpha-points", "4", "--out", str(copy)]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert "checkpoint small: already done" in capsys.readouterr().err
    g = zarr.open_group(copy, mode="r")
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(g[k][...]), v)
    assert main([*argv[:-2], "--eps", "1e-3", "--out", str(copy), "--resume"]) == 2
    assert "different config" in capsys.readouterr().err


def _bad_factory_module(tmp_path, monkeypatch):
    (tmp_path / "curv_bad_model.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class _Cut(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return g.detach()

        class CutModel(nn.Module):
            def __init__(self, input_shape, n_classes):
                super().__init__()
                self.lin = nn.Linear(64, n_classes)

            def forward(self, x):
                return _Cut.apply(self.lin(x.flatten(1)))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("curv_bad_model")
    path = save_checkpoint(tmp_path / "cut.pt", mod.CutModel((1, 8, 8), 10),
                           Recipe("curv_bad_model:CutModel", {}, (1, 8, 8), 10), {"epoch": 1})
    return ["--checkpoint", str(path), "--model", "curv_bad_model:CutModel"]


def _nan_checkpoint(tmp_path):
    model = tiny_mlp(widths=WIDTHS)
    with torch.no_grad():
        model.layers[0].weight.fill_(float("inf"))
    return ["--checkpoint", str(write_checkpoint(tmp_path / "nan.pt", model, WIDTHS, epoch=1, batch_size=8, lr=0.1))]


@pytest.mark.parametrize("case,extra,message", [
    ("eps_zero", ["--eps", "0"], "epsilon must be a positive number"),
    ("eps_negative", ["--eps", "1e-3,-5e-4"], "epsilon must be a positive number"),
    ("eps_garbage", ["--eps", "1e-3,abc"], "--eps takes comma-separated numbers"),
    ("subspace_too_big", ["--subspace-dim", "100000"], "subspace dimension 100000 must be between 1 and the "
                                                       "parameter count"),
    ("minibatch_too_big", ["--minibatch-sizes", "16,500"], "exceed the sample of 96 examples"),
    ("samples_too_many", ["--samples", "100000"], "exceeds the 1438 training examples"),
    ("hutchpp_budget", ["--trace-estimator", "hutch++", "--hutchinson-probes", "3"], "needs --hutchinson-probes >= 4"),
    ("non_finite", "nan", "NaN or Inf weights"),
    ("not_twice_differentiable", "cut", "not twice differentiable"),
])
def test_bad_input_exits_2_with_a_clear_message_and_leaves_no_store(case, extra, message, ckpts, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "out" / "bad.zarr"
    out.parent.mkdir()
    if extra == "nan":
        args = _nan_checkpoint(tmp_path)
    elif extra == "cut":
        args = _bad_factory_module(tmp_path, monkeypatch)
    else:
        args = ["--checkpoint", str(ckpts[0])]
    opts = list(BASE)
    if isinstance(extra, list):
        for flag in extra[::2]:
            if flag in opts:
                i = opts.index(flag)
                del opts[i:i + 2]
        opts += extra
    rc = main(["sharpness", *args, *opts, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # nothing half-written, no temp folders left
