"""What counts in a step is what is backpropagated: monitor.loss() under torch.no_grad() (an evaluation) records
nothing, a call never backpropagated (logging) is left out with a note, two calls summed into one backward (two
views, multi-task) are one step of both batches -- each checked against a float64 per-example autograd loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.errors import UsageError
from gradlab.monitor import NoiseMonitor
from gradlab.monitor.estimators import noise_estimates
from gradlab.task import cross_entropy
from .conftest import per_example_sums


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches(k, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


def _cat(*batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _check(ds, refs, sizes):
    layers = [str(v) for v in ds.layer.values]
    assert list(ds.batch_size.values) == sizes and (ds.missing.values == 0).all()
    assert list(ds.examples_seen.values) == list(np.cumsum(sizes))
    for k, (s1, s2) in enumerate(refs):
        np.testing.assert_allclose(ds.gram_sum_layer.isel(step=k).values, [s1[n] for n in layers], rtol=1e-12)
        np.testing.assert_allclose(ds.gram_trace_layer.isel(step=k).values, [s2[n] for n in layers], rtol=1e-12)
        g2, tr = noise_estimates(sum(s1.values()), sum(s2.values()), sizes[k], sizes[k])
        assert ds.trace_cov.sel(group="all").values[k] == pytest.approx(float(tr), rel=1e-12)
        assert ds.grad_sq_norm.sel(group="all").values[k] == pytest.approx(float(g2), rel=1e-12)


@pytest.mark.parametrize("background", [False, True])
def test_an_evaluation_under_no_grad_is_not_recorded(tmp_path, background):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, held = _batches(3), _batches(1, n=20, seed=5)[0]
    refs, evals = [], []
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, background=background) as mon:
        for batch in train:
            with torch.no_grad():
                evals.append(float(mon.loss(held)))  # between steps: validation through the monitor
            refs.append(per_example_sums(model, cross_entropy, batch))
            opt.zero_grad()
            mon.loss(batch).backward()
            with torch.no_grad():  # and between backward and step
                mon.loss(held)
            opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr")
    _check(ds, refs, [8, 8, 8])
    assert not any("not backpropagated" in n for n in ds.attrs["notes"])
    with torch.no_grad():
        assert evals[0] == pytest.approx(float(cross_entropy(_mlp(), held).mean()))


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_logging_call_never_backpropagated_is_left_out_with_a_note(tmp_path, caplog, where):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs = []
    with caplog.at_level(logging.WARNING, "gradlab.monitor"):
        with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
            for batch in _batches(3):
                refs.append(per_example_sums(model, cross_entropy, batch))
                opt.zero_grad()
                if where == "before":
                    logged = float(mon.loss(batch).detach())  # the user logs the loss, then computes it again
                    mon.loss(batch).backward()
                else:
                    loss = mon.loss(batch)
                    loss.backward()
                    logged = float(mon.loss(batch).detach())
                assert logged == pytest.approx(float(cross_entropy(model, batch).detach().mean()))
                opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr")
    _check(ds, refs, [8, 8, 8])
    assert sum("not backpropagated" in n for n in ds.attrs["notes"]) == 1
    assert "not backpropagated" in caplog.text


def test_two_losses_summed_into_one_backward_are_one_step_of_both_batches(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _batches(6)
    refs = []
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        for a, b in zip(data[::2], data[1::2]):
            refs.append(per_example_sums(model, cross_entropy, _cat(a, b)))
            opt.zero_grad()
            (mon.loss(a) + mon.loss(b)).backward()  # two views' losses, each a mean over its 8: weights alike
            opt.step()
    _check(xr.open_zarr(tmp_path / "m.zarr"), refs, [16, 16, 16])


def test_two_batch_losses_summed_into_one_backward_are_not_estimated(tmp_path, caplog):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _batches(4)
    with caplog.at_level(logging.WARNING, "gradlab.monitor"):
        with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, estimator="two-batch") as mon:
            for a, b in zip(data[::2], data[1::2]):
                opt.zero_grad()
                ((mon.loss(a) + mon.loss(b)) / 2).backward()  # one backward: the micro-batches cannot be told apart
                opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr")
    assert (ds.missing.values == 4).all() and np.isnan(ds.trace_cov.values).all()
    assert "each with its own backward" in caplog.text


def test_a_loss_without_backward_in_a_two_batch_step_is_left_out(tmp_path):
    """Two micro-batches backpropagated one by one plus a logging call: the estimate is that of the two."""
    data = _batches(2)

    def run(path, log_call):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, estimator="two-batch") as mon:
            opt.zero_grad()
            for mb in data:
                (mon.loss(mb) / 2).backward()
            if log_call:
                mon.loss(data[0])
            opt.step()
        return xr.open_zarr(path)

    plain, logged = run(tmp_path / "a.zarr", False), run(tmp_path / "b.zarr", True)
    assert int(logged.missing[0]) == 0 and int(logged.batch_size[0]) == 16
    np.testing.assert_array_equal(logged.trace_cov.values, plain.trace_cov.values)


def test_a_step_with_no_backpropagated_loss_records_nan_loss(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()  # not through the monitor
        opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr")
    assert int(ds.missing[0]) == 5 and int(ds.batch_size[0]) == 0 and np.isnan(float(ds.loss[0]))


def test_recurrent_biases_are_in_the_bias_group(tmp_path):
    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = RNN().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        opt.zero_grad()
        mon.loss((x, y)).backward()
        opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr")
    kinds = dict(zip(map(str, ds.layer.values), map(str, ds.param_kind.values)))
    assert kinds["rnn.bias_ih_l0"] == kinds["rnn.bias_hh_l0"] == kinds["out.bias"] == "bias"
    assert kinds["rnn.weight_ih_l0"] == "weight"
    bias = [n for n, k in kinds.items() if k == "bias"]
    assert float(ds.gram_sum.sel(group="bias")[0]) == pytest.approx(
        float(ds.gram_sum_layer.sel(layer=bias)[0].sum()), rel=1e-12)


def test_a_resume_keeps_the_stores_chunk_size(tmp_path):
    def steps(mon, model, opt, batches):
        for batch in batches:
            opt.zero_grad()
            mon.loss(batch).backward()
            opt.step()

    data = _batches(10)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, chunk_steps=4) as mon:
        steps(mon, model, opt, data[:6])
        state = mon.state_dict()
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, resume=True,
                      start_step=state["step"]) as mon:  # chunk_steps left at its default (128)
        steps(mon, model, opt, data[6:])
    ds = xr.open_zarr(tmp_path / "m.zarr")
    assert list(ds.step.values) == list(range(10)) and np.isfinite(ds.loss.values).all()
    assert ds.attrs["chunk_steps"] == 4


def test_sgd_momentum_update_norm_is_zero_for_a_parameter_without_gradient(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
            self.t = 0

        def forward(self, x):
            self.t += 1
            return self.a(x) + (self.b(x) if self.t % 2 else 0)  # b unused on even calls

    torch.manual_seed(0)
    model = Branchy().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    real = []
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, distances="optimizer") as mon:
        for batch in _batches(4, seed=3):
            x, y = batch
            before = model.b.weight.detach().clone()
            opt.zero_grad()
            mon.loss((x[:, :4], y)).backward()
            opt.step()
            real.append(float((model.b.weight.detach() - before).norm()))
    ds = xr.open_zarr(tmp_path / "m.zarr")
    got = ds.update_norm_layer.sel(layer="b.weight").values
    assert real[1] == real[3] == 0
    np.testing.assert_allclose(got, real, rtol=1e-12, atol=0)


def test_batch_norm_switched_to_training_after_the_monitor_was_built_is_noted(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        model.train()
        opt.zero_grad()
        mon.loss(_batches(1)[0]).backward()
        opt.step()
    notes = xr.open_zarr(tmp_path / "m.zarr").attrs["notes"]
    assert any("batch norm in training mode (BatchNorm1d) couples" in n for n in notes)


def test_parameters_frozen_mid_run_are_said_frozen_not_replaced(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        for k, batch in enumerate(_batches(3)):
            if k == 1:
                model[0].requires_grad_(False)
            opt.zero_grad()
            mon.loss(batch).backward()
            opt.step()
    notes = xr.open_zarr(tmp_path / "m.zarr").attrs["notes"]
    assert any("were frozen (requires_grad=False)" in n for n in notes)
    assert not any("replaced" in n for n in notes)


def test_framework_callbacks_refuse_the_two_batch_estimator_when_built():
    from gradlab.monitor.checks import refuse_managed

    with pytest.raises(UsageError, match="estimator='two-batch' needs the micro-batches"):
        refuse_managed({"estimator": "two-batch"}, "NoiseMonitorCallback", "fit(ckpt_path=...)")
    refuse_managed({"estimator": "per-example", "every": 2}, "NoiseMonitorCallback", "fit(ckpt_path=...)")
