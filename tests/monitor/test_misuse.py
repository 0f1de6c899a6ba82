"""Bad input and misuse: a reduced loss, a batch of one, non-finite gradients, two-batch micro-batches, BN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from gradlab.errors import UsageError
from gradlab.monitor import NoiseMonitor
from gradlab.monitor.estimators import noise_estimates
from gradlab.monitor.store import MISSING


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_an_already_reduced_loss_is_one_clear_error(tmp_path):
    model = nn.Linear(4, 3).double()
    mon = NoiseMonitor(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), tmp_path / "m.zarr")
    with pytest.raises(UsageError, match=r"scalar \(an already reduced loss\).*reduction='none'"):
        mon.loss(_data())
    mon.close()


def test_batch_of_one_is_recorded_as_missing_with_the_reason(tmp_path):
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        for sl in (slice(0, 1), slice(0, 8)):
            opt.zero_grad()
            mon.loss((x[sl], y[sl])).backward()
            opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert list(ds.missing.values) == [1, 0] and "batch of 1" in MISSING[1]
    assert ds.missing.attrs["flag_meanings"].split(" | ")[1] == MISSING[1]
    assert np.isnan(ds.grad_sq_norm.values[0]).all() and np.isfinite(ds.grad_sq_norm.values[1]).all()
    assert np.isfinite(ds.update_norm.values).all() and np.isfinite(ds.loss.values).all()


def test_non_finite_gradients_are_counted_flagged_and_training_goes_on(tmp_path):
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    bad = x.clone()
    bad[2, 1] = float("inf")
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:
        for xb in (x, bad, x):
            opt.zero_grad()
            mon.loss((xb, y)).backward()
            mon.step()
            if torch.isfinite(model.weight.grad).all():
                opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert list(ds.missing.values) == [0, 2, 0]
    assert ds.nonfinite_count.values[1] > 0 and ds.nonfinite_count.values[0] == 0
    # the flagged step leaves the moving average alone: it decays but gets no term
    assert np.isfinite(ds.b_noise.values[2]).all()


def test_two_batch_estimator_from_micro_batches_equals_its_formula(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data(12)
    micro = [slice(0, 4), slice(4, 8), slice(8, 12)]
    sums = []
    for sl in micro:
        model.zero_grad()
        F.cross_entropy(model(x[sl]), y[sl], reduction="sum").backward()
        sums.append([p.grad.clone() for p in model.parameters()])
    total = [sum(s[j] for s in sums) for j in range(4)]
    s1 = sum(float((t ** 2).sum()) for t in total)
    q = sum(sum(float((g ** 2).sum()) for g in s) / 4 for s in sums)
    g2, tr = noise_estimates(s1, q, 12, 3)

    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, estimator="two-batch") as mon:
        opt.zero_grad()
        for sl in micro:
            (mon.loss((x[sl], y[sl])) / 3).backward()  # mean per micro-batch, averaged over micro-batches
        opt.step()
        opt.zero_grad()
        mon.loss((x, y)).backward()  # one micro-batch: no two-batch estimate
        opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert float(ds.grad_sq_norm.sel(group="all")[0]) == pytest.approx(float(g2), rel=1e-12)
    assert float(ds.trace_cov.sel(group="all")[0]) == pytest.approx(float(tr), rel=1e-12)
    assert int(ds.n_groups[0]) == 3 and list(ds.missing.values) == [0, 4]
    with NoiseMonitor(model, "cross-entropy", tmp_path / "o.zarr", estimator="two-batch") as mon:
        with pytest.raises(UsageError, match="observe"):
            mon.observe((x, y))


def test_every_k_records_every_kth_step_and_counts_all_examples(tmp_path):
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, every=3) as mon:
        for _ in range(7):
            opt.zero_grad()
            mon.loss((x, y)).backward()
            opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert list(ds.step.values) == [0, 3, 6] and list(ds.examples_seen.values) == [8, 32, 56]


def test_batch_norm_in_training_mode_is_noted_and_its_parameters_are_handled(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:
        mon.loss(_data()).backward()
        mon.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert "couples the examples" in ds.attrs["notes"][0]
    assert set(ds.attrs["excluded_params"]) == {"1.weight", "1.bias"}
    assert np.isnan(ds.gram_trace_layer.sel(layer="1.weight").values).all()
    assert np.isfinite(ds.gram_trace.sel(group="all").values).all()


def test_step_with_an_optimizer_attached_is_refused(tmp_path):
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt) as mon:
        with pytest.raises(UsageError, match="optimizer.step"):
            mon.step()


def test_attach_for_train_wires_the_loop_and_resumes(tmp_path):
    from gradlab.monitor import attach_for_train

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(32)
    path = tmp_path / "runs" / "monitor.zarr"
    mon = attach_for_train(model, opt, "cross-entropy", path, every=1, pool_size=32, config={"seed": 0})
    for t in range(4):
        idx = torch.arange(8 * t, 8 * t + 8)
        opt.zero_grad(set_to_none=True)
        mon.loss((x[idx], y[idx])).backward()
        opt.step()
    mon.flush()  # before saving a checkpoint at step 4
    mon.close()
    mon = attach_for_train(model, opt, "cross-entropy", path, every=1, pool_size=32, config={"seed": 0},
                           resume=True, start_step=4)
    opt.zero_grad()
    mon.loss((x[:8], y[:8])).backward()
    opt.step()
    mon.close()
    ds = xr.open_zarr(path, consolidated=False)
    assert list(ds.step.values) == [0, 1, 2, 3, 4] and "32 examples" in ds.attrs["sampling"]
    assert json.loads(ds.attrs["config"])["seed"] == 0


def test_a_loss_reduced_outside_the_monitor_is_recorded_as_missing_and_said_once(tmp_path, caplog):
    """Attached with optimizer=, but the loop backpropagates its own F.cross_entropy (already reduced): the steps
    are recorded (update norm, lr) with missing code 5 and one log warning names the fix; training goes on."""
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt):
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        with NoiseMonitor(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), tmp_path / "o.zarr") as other:
            with pytest.raises(UsageError, match=r"scalar \(an already reduced loss\)"):  # observe(), such a fn
                other.observe((x, y))
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert list(ds.missing.values) == [5, 5, 5] and "no backward pass" in MISSING[5]
    assert (ds.nonfinite_count.values == 0).all()  # nothing was measured, so nothing non-finite was found
    assert np.isnan(ds.b_noise.values).all() and (ds.update_norm.sel(group="all").values > 0).all()
    said = [r.getMessage() for r in caplog.records if "monitor.loss(batch)" in r.getMessage()]
    assert len(said) == 1 and "step 0" in said[0]


def test_a_store_path_that_is_a_file_is_refused_and_left_alone(tmp_path):
    f = tmp_path / "run.zarr"
    f.write_text("mine")
    for kw in ({}, {"resume": True, "start_step": 0}):
        with pytest.raises(UsageError, match="holds other data, not a gradlab monitor store; choose a new"):
            NoiseMonitor(nn.Linear(3, 2), "cross-entropy", f, **kw)
    assert f.read_text() == "mine"


def test_a_batch_larger_than_the_pool_is_a_usage_error_naming_both(tmp_path):
    """pool_size is the number of examples batches are drawn from without replacement: a step with more examples
    cannot come from it (the finite-population factor would be negative)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, pool_size=8)
    opt.zero_grad()
    mon.loss((torch.randn(16, 3), torch.randint(0, 2, (16,)))).backward()
    with pytest.raises(UsageError, match=r"16 examples, more than pool_size=8.*size of the training set"):
        opt.step()
    mon.close()


@pytest.mark.parametrize("n", [6, 2100], ids=["rows-copied", "rows-counted-on-device"])
def test_the_non_finite_count_is_the_number_of_non_finite_per_example_norms(tmp_path, n):
    """nonfinite_count = the non-finite per-example squared norms plus the non-finite squared norms of the batch
    gradient (its long_name), counted the same way whether the rows are copied to the host (few) or counted where
    they are (2 tensors × 2100 examples > 4096 entries): two examples with an infinite input make 2 × 2 + 2."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    x[1, 0] = x[4, 2] = float("inf")
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:
        mon.loss((x, y)).backward()
        mon.step()
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    per = []  # the brute-force count: per-example gradients, one at a time
    for i in range(n):
        gs = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        per += [bool(torch.isfinite(g.pow(2).sum())) for g in gs]
    batch = [bool(torch.isfinite(g.pow(2).sum())) for g in torch.autograd.grad(
        F.cross_entropy(model(x), y, reduction="sum"), list(model.parameters()))]
    assert per.count(False) == 4 and batch.count(False) == 2
    assert int(ds.nonfinite_count.values[0]) == per.count(False) + batch.count(False)
    assert int(ds.missing.values[0]) == 2


def test_a_penalty_added_to_the_monitored_loss_is_found_and_no_step_is_estimated(tmp_path, caplog):
    """(monitor.loss(b) + λ‖θ‖²).backward(): ‖.grad‖² is then not the data gradient's (S₁ 27 % high in an external
    user's run, with missing = 0).  The first recorded step compares the hooked layers' Σᵢ wᵢgᵢ with .grad; every
    step is then missing = 6 with a note naming the fix.  The same loop with the optimizer's weight decay is
    estimated."""
    import logging

    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    for penalty in (True, False):
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.0 if penalty else 0.5)
        path = tmp_path / f"m{penalty}.zarr"
        with caplog.at_level(logging.WARNING), NoiseMonitor(model, "mse", path, optimizer=opt) as mon:
            for _ in range(3):
                opt.zero_grad()
                loss = mon.loss((x, y))
                if penalty:
                    loss = loss + 0.25 * sum(p.pow(2).sum() for p in model.parameters())
                loss.backward()
                opt.step()
        ds = xr.open_zarr(path, consolidated=False)
        if penalty:
            assert list(ds.missing.values) == [6, 6, 6] and np.isnan(ds.trace_cov.values).all()
            assert "weight_decay" in json.loads(ds.attrs["notes"])[-1] if isinstance(ds.attrs["notes"], str) \
                else "weight_decay" in ds.attrs["notes"][-1]
            assert "terms besides monitor.loss(batch)" in caplog.text
        else:
            assert list(ds.missing.values) == [0, 0, 0] and np.isfinite(ds.trace_cov.values).all()


def test_a_store_without_steps_is_started_afresh_and_one_with_steps_is_kept(tmp_path):
    """A first loss() that fails (here: an already reduced loss) leaves a store with no step; the corrected rerun
    at the same path starts afresh instead of asking for resume=True.  A store with steps still needs resume."""
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    path = tmp_path / "m.zarr"
    mon = NoiseMonitor(nn.Linear(3, 2), lambda m, b: F.cross_entropy(m(b[0]), b[1]), path)
    with pytest.raises(UsageError, match="already reduced"):
        mon.loss((x, y))
    mon.close()
    with NoiseMonitor(nn.Linear(3, 2), "cross-entropy", path) as mon:
        mon.loss((x, y)).backward()
        mon.step()
    assert xr.open_zarr(path, consolidated=False).sizes["step"] == 1
    with pytest.raises(Exception, match="already holds a gradlab monitor store; pass resume=True"):
        NoiseMonitor(nn.Linear(3, 2), "cross-entropy", path)


@pytest.mark.parametrize("zeroing", ["none", "set_to_none", "zero_", "after_loss", "accumulate"])
def test_a_grad_not_zeroed_since_the_last_step_is_found_at_every_recorded_step(tmp_path, zeroing, caplog):
    """Without opt.zero_grad() the backward adds to the last step's .grad: S₁ = ‖.grad‖² grew 16× over 4 steps of
    a fixed batch in an external user's run, with missing = 0 (the first-step check saw .grad None).  Every
    recorded step now compares each .grad with the tensor and version the last step left.  Zeroing before
    mon.loss(), after it, or in place, and micro-batches accumulated within one step, are not flagged."""
    import logging

    x, y = _data(8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # θ fixed: every step measures the same batch at one θ
    with caplog.at_level(logging.WARNING), NoiseMonitor(model, "cross-entropy", tmp_path / "g.zarr",
                                                        optimizer=opt, reduction="sum") as mon:
        for _ in range(4):
            if zeroing in ("set_to_none", "accumulate"):
                opt.zero_grad(set_to_none=True)
            elif zeroing == "zero_":
                opt.zero_grad(set_to_none=False)
            if zeroing == "accumulate":
                mon.loss((x[:3], y[:3])).backward()
                mon.loss((x[3:], y[3:])).backward()
            else:
                loss = mon.loss((x, y))
                if zeroing == "after_loss":
                    opt.zero_grad()
                loss.backward()
            opt.step()
    ds = xr.open_zarr(tmp_path / "g.zarr", consolidated=False)
    s1 = ds.gram_sum.sel(group="all").values
    if zeroing == "none":
        assert list(ds.missing.values) == [0, 6, 6, 6] and np.isnan(ds.trace_cov.values[1:]).all()
        assert "was not zeroed since the last optimizer step" in caplog.text
        assert caplog.text.count("was not zeroed") == 1
    else:
        assert list(ds.missing.values) == [0, 0, 0, 0] and "was not zeroed" not in caplog.text
        np.testing.assert_allclose(s1, s1[0], rtol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"every": None}, "every must be an integer ≥ 1"),
    ({"every": 2.5}, "every must be an integer ≥ 1"),
    ({"every": "2"}, "every must be an integer ≥ 1"),
    ({"ema_decay": "0.9"}, r"ema_decay must be a number in \[0, 1\)"),
    ({"level": 1.5}, r"level must be a number in \(0, 1\)"),
    ({"level": 0}, r"level must be a number in \(0, 1\)"),
    ({"pool_size": "100"}, "pool_size must be the number of training examples"),
    ({"chunk_steps": 0}, "chunk_steps must be an integer ≥ 1"),
    ({"loss": None}, "loss must be a loss name"),
    ({"loss": 42}, "loss must be a loss name"),
    ({"path": None}, "path must be the store's path"),
    ({"path": 123}, "path must be the store's path"),
    ({"optimizer": "sgd"}, "optimizer must be the torch.optim.Optimizer"),
    ({"optimizer": "other"}, "the optimizer steps none of the model's parameters"),
    ({"start_step": 5}, "start_step=5 is used only with resume=True"),
    ({"config": {"x": object()}}, "config must hold JSON values only"),
])
def test_bad_arguments_are_one_line_errors_before_anything_is_written(tmp_path, kwargs, message):
    model = nn.Linear(4, 3).double()
    if kwargs.get("optimizer") == "other":
        kwargs = {"optimizer": torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1)}
    args = {"loss": "cross-entropy", "path": tmp_path / "m.zarr", **kwargs}
    with pytest.raises(UsageError, match=message) as err:
        NoiseMonitor(model, args.pop("loss"), args.pop("path"), **args)
    assert len(str(err.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no store, no lock file
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:  # and nothing is left locked
        mon.observe(_data())


def test_unwritable_paths_and_an_empty_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot write a monitor store at"):
        NoiseMonitor(nn.Linear(4, 3), "cross-entropy", tmp_path / "file" / "m.zarr")
    (tmp_path / "empty.zarr").mkdir()  # made beforehand, empty: used
    with NoiseMonitor(nn.Linear(4, 3).double(), "cross-entropy", tmp_path / "empty.zarr") as mon:
        mon.observe(_data())
    assert xr.open_zarr(tmp_path / "empty.zarr").sizes["step"] == 1


def test_a_monitor_that_records_no_step_says_why_at_close(tmp_path, caplog):
    import logging

    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with caplog.at_level(logging.WARNING), NoiseMonitor(model, "cross-entropy", tmp_path / "a.zarr") as mon:
        mon.loss((x, y)).backward()  # no optimizer=, no monitor.step()
        opt.step()
    assert "recorded no step: no monitor.step() call closed a step" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), NoiseMonitor(model, "cross-entropy", tmp_path / "b.zarr", optimizer=opt,
                                                        every=5) as mon:
        for _ in range(3):
            opt.zero_grad()
            mon.loss((x, y)).backward()
            opt.step()
    assert "recorded" not in caplog.text  # step 0 is recorded


def test_a_backward_without_an_optimizer_step_is_not_merged_into_the_next_step(tmp_path, caplog):
    """A GradScaler skips optimizer.step() when the scaled gradients hold inf/NaN; the loop zeroes the gradients
    and goes on.  That batch was merged into the next step (batch_size 16 + 16, the good batch's estimate lost);
    it is dropped now, with one note."""
    import logging

    x, y = _data(16)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING), NoiseMonitor(model, "cross-entropy", tmp_path / "s.zarr",
                                                        optimizer=opt) as mon:
        for t in range(4):
            opt.zero_grad()
            mon.loss((x, y)).backward()
            if t != 1:  # step 1 skipped
                opt.step()
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert list(ds.step.values) == [0, 1, 2] and list(ds.batch_size.values) == [16, 16, 16]
    assert (ds.missing.values == 0).all() and list(ds.examples_seen.values) == [16, 32, 48]
    assert caplog.text.count("no optimizer step") == 1
