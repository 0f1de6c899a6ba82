"""Each recorded step's ‖Σgᵢ‖² and Σ‖gᵢ‖² equal a float64 per-example autograd loop on the same batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.monitor import NoiseMonitor
from gradlab.monitor.estimators import noise_estimates
from gradlab.task import cross_entropy
from .conftest import per_example_sums


def _run_steps(model, batches, path, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    refs = []
    with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=2, **kw) as mon:
        for batch in batches:
            refs.append(per_example_sums(model, cross_entropy, batch))
            opt.zero_grad()
            (mon.loss(batch) / 3.0).backward()  # any scaling of the reduced loss is undone exactly
            opt.step()
    return refs, xr.open_zarr(path, consolidated=False)


def test_every_layer_family_matches_per_example_autograd(seq_task, tmp_path):
    model, (ids, y) = seq_task
    batches = [(ids, y), (ids.flip(0), y.flip(0)), (ids[:4], y[:4])]
    refs, ds = _run_steps(model, batches, tmp_path / "m.zarr")
    assert ds.attrs["fallback_params"] == ["scale"] and ds.attrs["excluded_params"] == []
    layers = [str(v) for v in ds.layer.values]
    for k, (s1, s2) in enumerate(refs):
        got1 = ds.gram_sum_layer.isel(step=k).values
        got2 = ds.gram_trace_layer.isel(step=k).values
        np.testing.assert_allclose(got1, [s1[n] for n in layers], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(got2, [s2[n] for n in layers], rtol=1e-12, atol=1e-300)
        b = len(batches[k][1])
        g2, tr = noise_estimates(sum(s1.values()), sum(s2.values()), b, b)
        assert ds.grad_sq_norm.sel(group="all").values[k] == pytest.approx(float(g2), rel=1e-12)
        assert ds.trace_cov.sel(group="all").values[k] == pytest.approx(float(tr), rel=1e-12)
    assert (ds.batch_size.values == [9, 9, 4]).all() and (ds.missing.values == 0).all()


@pytest.mark.parametrize("t,d_in,d_out", [(40, 2, 3), (3, 16, 12)], ids=["materialised", "gram-of-grams"])
def test_both_sequence_paths_match(tmp_path, t, d_in, d_out):
    """T(d_in + d_out) > d_in·d_out: per-example gradients are materialised, else the Gram of Grams -- same numbers."""
    from gradlab.monitor.norms import linear_sq_norms

    a, d = torch.randn(5, t, d_in, dtype=torch.float64), torch.randn(5, t, d_out, dtype=torch.float64)
    brute = torch.einsum("bto,bti->boi", d, a).pow(2).sum((1, 2))
    torch.testing.assert_close(linear_sq_norms(a, d), brute, rtol=1e-12, atol=0)
    torch.manual_seed(1)
    lin = nn.Linear(d_in, d_out).double()
    model = nn.Sequential(lin, nn.Tanh(), nn.Flatten(), nn.Linear(d_out * t, 2)).double()
    x = torch.randn(6, t, d_in, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    refs, ds = _run_steps(model, [(x, y)], tmp_path / "m.zarr")
    s1, s2 = refs[0]
    layers = [str(v) for v in ds.layer.values]
    np.testing.assert_allclose(ds.gram_trace_layer.isel(step=0).values, [s2[n] for n in layers], rtol=1e-12)
    np.testing.assert_allclose(ds.gram_sum_layer.isel(step=0).values, [s1[n] for n in layers], rtol=1e-12)


def test_the_vmap_fallback_matches_too(seq_task, tmp_path, caplog):
    """A loss torch.func can map (no data-dependent checks): the fallback tensor goes through vmap(grad)."""
    import logging

    import torch.nn.functional as F

    model, batch = seq_task

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    s1, s2 = per_example_sums(model, loss, batch)
    import gradlab.monitor.norms as monitor_mod  # the fallback's slow path lives beside vmap's

    calls = []
    orig = monitor_mod.loop_sq_norms
    norms_loop = lambda *a: calls.append(1) or orig(*a)  # noqa: E731 - counts the slow path

    monitor_mod.loop_sq_norms = norms_loop
    try:
        with caplog.at_level(logging.WARNING), NoiseMonitor(model, loss, tmp_path / "v.zarr") as mon:
            mon.loss(batch).backward()
            mon.step()
    finally:
        monitor_mod.loop_sq_norms = orig
    assert not calls and not caplog.records
    ds = xr.open_zarr(tmp_path / "v.zarr", consolidated=False)
    got = float(ds.gram_trace_layer.sel(layer="scale").values[0])
    assert got == pytest.approx(s2["scale"], rel=1e-12)


def test_observe_equals_the_hooked_backward_and_leaves_grad_alone(seq_task, tmp_path):
    model, batch = seq_task
    s1, s2 = per_example_sums(model, cross_entropy, batch)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "o.zarr") as mon:
        mon.observe(batch)
    assert all(p.grad is None for p in model.parameters())
    ds = xr.open_zarr(tmp_path / "o.zarr", consolidated=False)
    layers = [str(v) for v in ds.layer.values]
    np.testing.assert_allclose(ds.gram_trace_layer.isel(step=0).values, [s2[n] for n in layers], rtol=1e-12)
    np.testing.assert_allclose(ds.gram_sum_layer.isel(step=0).values, [s1[n] for n in layers], rtol=1e-12)
    assert np.isnan(ds.update_norm.values).all() and np.isnan(ds.lr.values).all()


def test_observe_over_several_batches_of_one_step_measures_their_summed_gradient(seq_task, tmp_path):
    model, (ids, y) = seq_task  # Lightning/HF with gradient accumulation: one observe() per micro-batch
    s1, s2 = per_example_sums(model, cross_entropy, (ids, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "o.zarr", optimizer=opt) as mon:
        for sl in (slice(0, 4), slice(4, 7), slice(7, 9)):
            mon.observe((ids[sl], y[sl]))
        opt.step()
    ds = xr.open_zarr(tmp_path / "o.zarr", consolidated=False)
    assert int(ds.batch_size[0]) == 9 and int(ds.missing[0]) == 0
    layers = [str(v) for v in ds.layer.values]
    np.testing.assert_allclose(ds.gram_sum_layer.isel(step=0).values, [s1[n] for n in layers], rtol=1e-12)
    np.testing.assert_allclose(ds.gram_trace_layer.isel(step=0).values, [s2[n] for n in layers], rtol=1e-12)


def test_gradient_accumulation_pools_the_micro_batches(seq_task, tmp_path):
    model, (ids, y) = seq_task
    s1, s2 = per_example_sums(model, cross_entropy, (ids, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "a.zarr", optimizer=opt, reduction="sum") as mon:
        opt.zero_grad()
        for sl in (slice(0, 4), slice(4, 9)):
            mon.loss((ids[sl], y[sl])).backward()
        opt.step()
    ds = xr.open_zarr(tmp_path / "a.zarr", consolidated=False)
    assert int(ds.batch_size[0]) == 9 and int(ds.n_groups[0]) == 9
    assert float(ds.gram_sum.sel(group="all")[0]) == pytest.approx(sum(s1.values()), rel=1e-12)
    assert float(ds.gram_trace.sel(group="all")[0]) == pytest.approx(sum(s2.values()), rel=1e-12)


def test_update_norm_distance_and_lr_are_the_optimizer_s(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    before = None
    with NoiseMonitor(model, "cross-entropy", tmp_path / "u.zarr", optimizer=opt) as mon:
        for _ in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            mon.loss((x, y)).backward()
            opt.step()
    ds = xr.open_zarr(tmp_path / "u.zarr", consolidated=False)
    upd = np.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(model.parameters(), before)))
    dist = np.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(model.parameters(), theta0)))
    assert float(ds.update_norm.sel(group="all")[-1]) == pytest.approx(upd, rel=1e-12)
    assert float(ds.dist_init.sel(group="all")[-1]) == pytest.approx(dist, rel=1e-12)
    assert (ds.lr.values == 0.3).all() and list(ds.examples_seen.values) == [8, 16, 24]


class _SharedInput(nn.Module):
    """q, k, v projections reading one (B, T, d) tensor (their input Gram is computed once and shared), an output
    projection reading another (its own Gram), a large-
    vocabulary token embedding (V > T²: the Gram path) and a position embedding called on (T,) without the batch
    dimension (unhooked into the torch.func fallback)."""

    def __init__(self, vocab: int = 30, t: int = 2, d: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(t * d, 3)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        return self.head(self.proj(att @ self.v(x)).flatten(1))  # proj: another input, its own Gram


def test_shared_input_grams_large_vocabulary_and_unbatched_embedding_match(tmp_path):
    from gradlab.monitor.norms import PerExampleNorms

    torch.manual_seed(0)
    model = _SharedInput().double()
    hooks = PerExampleNorms(model)
    hooks.remove()
    assert hooks.fallback == []  # every tensor is hooked until a call shows pos has no batch dimension
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 30, (7, 2), generator=g), torch.randint(0, 3, (7,), generator=g)) for _ in range(2)]
    refs, ds = _run_steps(model, batches, tmp_path / "m.zarr")
    # T = B: pos(arange(T)) has the batch's length; its values still say it is not per-example
    torch.manual_seed(0)
    square = _SharedInput(vocab=30, t=3).double()
    sq_batch = (torch.randint(0, 30, (3, 3), generator=g), torch.randint(0, 3, (3,), generator=g))
    (sq_ref,), sq_ds = _run_steps(square, [sq_batch], tmp_path / "square.zarr")
    assert sq_ds.attrs["fallback_params"] == ["pos.weight"]
    sq_layers = [str(v) for v in sq_ds.layer.values]
    np.testing.assert_allclose(sq_ds.gram_trace_layer.isel(step=0).values, [sq_ref[1][n] for n in sq_layers],
                               rtol=1e-12, atol=1e-25)
    assert ds.attrs["fallback_params"] == ["pos.weight"]
    layers = [str(v) for v in ds.layer.values]
    for k, (s1, s2) in enumerate(refs):
        # atol: the key bias's gradient is 0 up to rounding (softmax ignores a constant added to a row of scores)
        np.testing.assert_allclose(ds.gram_sum_layer.isel(step=k).values, [s1[n] for n in layers], rtol=1e-12,
                                   atol=1e-25)
        np.testing.assert_allclose(ds.gram_trace_layer.isel(step=k).values, [s2[n] for n in layers], rtol=1e-12,
                                   atol=1e-25)


@pytest.mark.parametrize("make_opt,kind", [
    (lambda p: torch.optim.SGD(p, lr=0.3), "grad"),
    (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, dampening=0.1, weight_decay=0.01), "momentum"),
    (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True), None),  # not known: the snapshot
    (lambda p: torch.optim.Adam(p, lr=0.01), None),                             # not known: the snapshot
], ids=["sgd", "sgd-momentum", "nesterov", "adam"])
def test_update_norm_from_the_optimizer_equals_the_realized_difference(tmp_path, make_opt, kind):
    from gradlab.monitor.distances import sgd_direction

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    got = {}
    for mode in (True, "optimizer", False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        model[2].bias.requires_grad_(False)  # a frozen tensor: not monitored, not moved
        opt = make_opt([p for p in model.parameters() if p.requires_grad])
        realized = []
        with NoiseMonitor(model, "cross-entropy", tmp_path / f"{mode}.zarr", optimizer=opt, distances=mode) as mon:
            for _ in range(3):
                before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
                opt.zero_grad()
                mon.loss((x, y)).backward()
                opt.step()
                after = [p.detach() for p in model.parameters() if p.requires_grad]
                realized.append([float((a - b).norm()) for a, b in zip(after, before)])
        got[mode] = xr.open_zarr(tmp_path / f"{mode}.zarr", consolidated=False).update_norm_layer.values
    np.testing.assert_allclose(got[True], realized, rtol=1e-12)
    np.testing.assert_allclose(got["optimizer"], realized, rtol=1e-12)
    assert np.isnan(got[False]).all()
    assert sgd_direction(make_opt([nn.Parameter(torch.zeros(1))])) == kind
    with pytest.raises(Exception, match="distances must be"):
        NoiseMonitor(nn.Linear(2, 2), "cross-entropy", tmp_path / "bad.zarr", distances="fast")


@pytest.mark.parametrize("mode", [True, "optimizer"])
def test_float32_norms_are_accurate_on_a_million_entries(tmp_path, mode):
    """The update norm and the distance from init of a float32 model with a 1024×1024 weight equal their float64
    values computed from the same stored parameters to 1e-7 (torch's CPU float32 vector_norm is off by ~1e-5 here:
    it accumulates each SIMD lane sequentially)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(16, 1024), torch.randint(0, 3, (16,))
    theta0 = [p.detach().double().clone() for p in model.parameters()]
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, distances=mode) as mon:
        for _ in range(2):
            before = [p.detach().double().clone() for p in model.parameters()]
            opt.zero_grad()
            mon.loss((x, y)).backward()
            opt.step()
    after = [p.detach().double() for p in model.parameters()]
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    want_dist = [float((a - b).norm()) for a, b in zip(after, theta0)]
    np.testing.assert_allclose(ds.dist_init_layer.values[-1], want_dist, rtol=1e-7)
    if mode is True:  # the realized difference of the stored parameters
        want_upd = [float((a - b).norm()) for a, b in zip(after, before)]
        np.testing.assert_allclose(ds.update_norm_layer.values[-1], want_upd, rtol=1e-7)
    else:  # η‖momentum buffer‖ in exact arithmetic, from the float32 buffer
        bufs = [opt.state[p]["momentum_buffer"].double() for p in model.parameters()]
        np.testing.assert_allclose(ds.update_norm_layer.values[-1], [0.5 * float(b.norm()) for b in bufs],
                                   rtol=1e-7)


class _TiedLM(nn.Module):
    """An output layer tied functionally to the embedding (``F.linear(h, self.emb.weight)``, GPT-2's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.h = nn.Embedding(10, 6), nn.Linear(6, 6)

    def forward(self, ids):
        return torch.nn.functional.linear(torch.tanh(self.h(self.emb(ids).mean(1))), self.emb.weight)


class _AlsoDirect(nn.Module):
    """A Linear's weight also used directly in the forward (``x @ self.a.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) + x @ self.a.weight)


class _MaskedLinear(nn.Linear):
    """A Linear subclass whose forward uses its weight otherwise (a fixed mask): its inputs and output gradients
    do not give the weight's per-example gradients."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight * self.mask, self.bias)


@pytest.mark.parametrize("case", ["tied-embedding", "weight-also-direct", "linear-subclass"])
def test_parameters_used_outside_their_module_match_per_example_autograd(tmp_path, case):
    """Without the graph check the tied weights' Σ‖gᵢ‖² was 73 % low with no flag (an external user's report)."""
    torch.manual_seed(0)
    if case == "tied-embedding":
        model = _TiedLM().double()
        x, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8,))
        moved = {"emb.weight"}
    elif case == "weight-also-direct":
        model = _AlsoDirect().double()
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        moved = {"a.weight"}
    else:
        lin = _MaskedLinear(6, 3)
        lin.register_buffer("mask", (torch.rand(3, 6) > 0.5).float())
        model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), lin).double()
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        moved = {"2.weight", "2.bias"}
    batches = [(x, y), (x.flip(0), y.flip(0))]
    refs, ds = _run_steps(model, batches, tmp_path / "m.zarr")
    assert moved <= set(ds.attrs["fallback_params"])
    layers = [str(v) for v in ds.layer.values]
    for k, (s1, s2) in enumerate(refs):
        np.testing.assert_allclose(ds.gram_sum_layer.isel(step=k).values, [s1[n] for n in layers], rtol=1e-12)
        np.testing.assert_allclose(ds.gram_trace_layer.isel(step=k).values, [s2[n] for n in layers], rtol=1e-12)


def _trained(make, monitor, tmp_path, steps=3):
    """θ and buffers after ``steps`` SGD steps of the model ``make()`` on fixed batches, with or without a monitor."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    model = make()
    x = torch.randn(48, *model.in_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / f"{monitor}.zarr", optimizer=opt) if monitor else None
    torch.manual_seed(123)  # the dropout masks
    for t in range(steps):
        b = (x[16 * t:16 * t + 16], y[16 * t:16 * t + 16])
        opt.zero_grad()
        (mon.loss(b) if mon else F.cross_entropy(model(b[0]), b[1])).backward()
        opt.step()
    if mon:
        mon.close()
    return model.state_dict(), (xr.open_zarr(tmp_path / f"{monitor}.zarr", consolidated=False) if mon else None)


def test_a_random_forward_excludes_the_fallback_parameters_and_leaves_training_unchanged(tmp_path):
    def make():
        torch.manual_seed(0)  # batch norm in eval mode: a fallback parameter in a model that draws dropout masks
        m = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        m[1].eval()
        m.in_shape = (6,)
        return m.double()

    plain, _ = _trained(make, False, tmp_path)
    monitored, ds = _trained(make, True, tmp_path)
    for k in plain:  # the monitor drew no random number of the run's generator
        torch.testing.assert_close(monitored[k], plain[k], rtol=0, atol=0)
    assert ds.attrs["excluded_params"] == ["1.weight", "1.bias"]
    assert any("draws random numbers" in note for note in ds.attrs["notes"])
    assert np.isnan(ds.gram_trace_layer.sel(layer="1.weight").values).all()
    assert np.isfinite(ds.gram_trace_layer.sel(layer="0.weight").values).all()  # the hooked layers still are


def test_the_fallback_leaves_batch_norm_running_statistics_alone(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
        m.in_shape = (2, 5, 5)
        return m.double()

    plain, _ = _trained(make, False, tmp_path)
    monitored, ds = _trained(make, True, tmp_path)
    assert ds.attrs["fallback_params"] == ["1.weight", "1.bias"]
    for k in plain:  # running_mean, running_var, num_batches_tracked and θ
        torch.testing.assert_close(monitored[k], plain[k], rtol=0, atol=0)
