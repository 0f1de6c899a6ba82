"""Loops that change ``.grad`` between backward() and the optimizer step (gradient clipping, a GradScaler), or that
the monitor can only partly measure (unequal micro-batches under a mean, one micro-batch for the two-batch
estimator, autocast): recorded correctly, or said once in the log and the store's notes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.monitor import NoiseMonitor
from gradlab.task import resolve_loss


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(dtype=torch.float64, n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g).to(dtype)
    return x, (x[:, :3].argmax(1))


def _brute(model, batch):
    """S₁ = ‖Σᵢ gᵢ‖² and Q = Σᵢ ‖gᵢ‖² over all trainable tensors (per-example autograd loop, unscaled loss)."""
    fn = resolve_loss("cross-entropy")
    x, y = batch
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    q = 0.0
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(fn(model, (x[i:i + 1], y[i:i + 1])).sum(), params)
        q += sum(float(g.double().pow(2).sum()) for g in gs)
        total = [t + g.double() for t, g in zip(total, gs)]
    return sum(float(t.pow(2).sum()) for t in total), q


def _run(tmp_path, edit, dtype=torch.float64, steps=5, b=8, scaler=None):
    model = _model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = _data(dtype)
    ref = []
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, background=False)
    for t in range(steps):
        batch = (x[t * b:(t + 1) * b], y[t * b:(t + 1) * b])
        ref.append(_brute(model, batch))
        opt.zero_grad()
        loss = mon.loss(batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            edit(model, t)
            opt.step()
    mon.close()
    return xr.open_zarr(tmp_path / "m.zarr", consolidated=False), np.array(ref)


def _check_against(ds, ref, rtol, b=8):
    s1, q = ref[:, 0], ref[:, 1]
    np.testing.assert_allclose(ds.gram_sum.sel(group="all").values, s1, rtol=rtol)
    np.testing.assert_allclose(ds.gram_trace.sel(group="all").values, q, rtol=rtol)
    g2 = (s1 - q) / (b * (b - 1))  # the with-replacement estimates from S₁ and Q (k = b)
    tr = (q - s1 / b) / (b - 1)
    np.testing.assert_allclose(ds.grad_sq_norm.sel(group="all").values, g2, rtol=rtol * 100)
    np.testing.assert_allclose(ds.trace_cov.sel(group="all").values, tr, rtol=rtol)


def _clip_all(model, t):
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert float(total) > 0.05  # the clip acts


def _clip_first(model, t):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05 if t == 0 else 1e9)


@pytest.mark.parametrize("edit", [_clip_all, _clip_first])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_clip_grad_norm_before_the_step_is_estimated_as_the_unclipped_gradient(tmp_path, caplog, edit, dtype, rtol):
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        ds, ref = _run(tmp_path, edit, dtype)
    assert (ds.missing.values == 0).all(), ds.missing.values
    assert np.isfinite(ds.b_noise.sel(group="all").values).all()
    assert "terms besides" not in caplog.text
    _check_against(ds, ref, rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_a_grad_scaler_records_the_unscaled_losses_estimates(tmp_path, caplog, dtype, rtol):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        ds, ref = _run(tmp_path, None, dtype, scaler=scaler)
    assert (ds.missing.values == 0).all(), ds.missing.values
    assert "terms besides" not in caplog.text
    _check_against(ds, ref, rtol)


def test_clip_grad_value_is_not_a_common_factor_and_is_still_refused(tmp_path, caplog):
    def clip_value(model, t):
        torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)

    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        ds, _ = _run(tmp_path, clip_value)
    assert (ds.missing.values == 6).all()
    assert "clip_grad_value_" in caplog.text


def test_a_penalty_is_still_found_with_the_common_factor_check(tmp_path, caplog):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
            for t in range(3):
                opt.zero_grad()
                loss = mon.loss((x[:8], y[:8])) + 1e-2 * sum(p.pow(2).sum() for p in model.parameters())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert (ds.missing.values == 6).all()
    assert "terms besides" in caplog.text


def _brute_autocast(model, loss, batch):
    """Per tensor ‖Σᵢ gᵢ‖² and Σᵢ ‖gᵢ‖² by a per-example autograd loop under the same bfloat16 autocast."""
    x, y = batch
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    tot = [0.0] * len(params)
    q = np.zeros(len(params))
    for i in range(x.shape[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            li = loss(model, (x[i:i + 1], y[i:i + 1])).sum()
        gs = torch.autograd.grad(li, params)
        q += [float(g.double().pow(2).sum()) for g in gs]
        tot = [t + g.double() for t, g in zip(tot, gs)]
    return names, np.array([float(t.pow(2).sum()) for t in tot]), q


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_bfloat16_autocast_forward_is_measured(tmp_path, caplog, kind, seq_task):
    if kind == "mlp":
        model, batch = _model(torch.float32), tuple(t[:8] for t in _data(torch.float32))
    else:
        model, batch = seq_task
        model = model.float()
    loss = resolve_loss("cross-entropy")
    names, s1, q = _brute_autocast(model, loss, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # θ stays: every step is the same batch at the same θ
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with NoiseMonitor(model, loss, tmp_path / "m.zarr", optimizer=opt, background=False) as mon:
            for _ in range(2):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    l = mon.loss(batch)
                l.backward()
                opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert (ds.missing.values == 0).all(), (ds.missing.values, caplog.text)
    assert list(ds.layer.values) == names
    for t in range(2):
        np.testing.assert_allclose(ds.gram_trace_layer.values[t], q, rtol=2e-2)
        np.testing.assert_allclose(ds.gram_sum_layer.values[t], s1, rtol=2e-2)


def _accumulate(tmp_path, estimator, sizes, scale):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, estimator=estimator) as mon:
        for t in range(3):
            opt.zero_grad()
            start = 0
            for b in sizes:
                mb = (x[start:start + b], y[start:start + b])
                start += b
                l = mon.loss(mb)
                (l / len(sizes) if scale == "n" else l * b / sum(sizes)).backward()
            opt.step()
    return xr.open_zarr(tmp_path / "m.zarr", consolidated=False)


@pytest.mark.parametrize("estimator,sizes,scale,code,said", [
    ("per-example", [8, 4, 12], "n", 3, "weights the examples unequally"),
    ("two-batch", [8, 4, 12], "n", 3, "weights the examples unequally"),
    ("two-batch", [16], "n", 4, "needs at least two micro-batches"),
    ("per-example", [8, 4, 12], "w", 0, None),
    ("two-batch", [8, 8], "n", 0, None)])
def test_unestimable_accumulation_is_said_once_with_the_fix(tmp_path, caplog, estimator, sizes, scale, code, said):
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        ds = _accumulate(tmp_path, estimator, sizes, scale)
    assert (ds.missing.values == code).all(), ds.missing.values
    if said is None:
        assert "missing = 3" not in caplog.text and "missing = 4" not in caplog.text
        return
    assert caplog.text.count(said) == 1
    assert sum(said in n for n in ds.attrs["notes"]) == 1
    assert f"missing = {code}" in caplog.text


def test_a_layer_replaced_after_the_monitor_was_built_is_said_once(tmp_path, caplog):
    model = _model()
    x, y = _data()
    said = "not those the monitor was built with"
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:
            for t in range(6):
                if t == 2:
                    assert said not in caplog.text
                    model[2] = nn.Linear(8, 3).double()
                model.zero_grad()
                mon.loss((x[:8], y[:8])).backward()
                mon.step()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert caplog.text.count(said) == 1
    assert "step 2:" in caplog.text and "'2.weight'" in caplog.text
    assert sum(said in n for n in ds.attrs["notes"]) == 1


def test_without_optimizer_dist_init_is_at_the_steps_start_and_noted(tmp_path):
    model = _model()
    x, y = _data()
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:
        for t in range(3):
            model.zero_grad()
            mon.loss((x[:8], y[:8])).backward()
            mon.step()  # before the parameters change
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert float(ds.dist_init.sel(group="all")[0]) == 0.0
    assert any("dist_init is ‖θ_t − θ₀‖" in n for n in ds.attrs["notes"])
