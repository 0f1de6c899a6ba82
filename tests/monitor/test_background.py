"""The update norm and distance from init on the background worker (``background=True``): the same store bit for bit
as on the training thread, an in-place edit of θ between steps found, and the argument checks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.errors import UsageError
from gradlab.monitor import NoiseMonitor
from gradlab.monitor import distances as distances_mod

VARS = ("dist_init", "dist_init_layer", "update_norm", "update_norm_layer", "b_noise", "grad_sq_norm_layer")


def _run(path, background, every, make_opt, edit_at=None, steps=20, chunk_steps=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    threads = set()
    measure = distances_mod.Distances._measure

    def spy(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return measure(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distances_mod.Distances, "_measure", spy)
        with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, every=every, background=background,
                          chunk_steps=chunk_steps) as mon:
            for k in range(steps):
                x = torch.randn(12, 6, generator=g, dtype=torch.float64)
                y = torch.randint(0, 3, (12,), generator=g)
                opt.zero_grad()
                mon.loss((x, y)).backward()
                opt.step()
                if k == edit_at:
                    with torch.no_grad():
                        model[0].weight.mul_(0.99)
    return xr.open_zarr(path, consolidated=False).load(), threads


OPTS = {"sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("opt", list(OPTS))
def test_background_worker_writes_the_same_store_bit_for_bit(tmp_path, every, opt):
    bg, threads = _run(tmp_path / "bg.zarr", True, every, OPTS[opt])
    fg, fg_threads = _run(tmp_path / "fg.zarr", False, every, OPTS[opt])
    assert threads and all(t.startswith("gradlab-monitor-distances") for t in threads)
    assert fg_threads == set()  # the training thread computes without the worker's entry point
    assert int(bg.sizes["step"]) == 20 // every + (20 % every > 0)
    for v in VARS:
        np.testing.assert_array_equal(bg[v].values, fg[v].values, err_msg=v)
    assert np.isfinite(bg.update_norm.values).all() and np.isfinite(bg.dist_init.values).all()
    assert "notes" not in bg.attrs or not any("background" in n for n in bg.attrs["notes"])


def test_an_in_place_edit_between_steps_is_found_and_the_worker_stops(tmp_path):
    """θ edited after step 5's optimizer step, while the worker may still read it: step 5's norms are NaN with a
    note, and every other step equals the training-thread run (whose step 5 was measured before the edit)."""
    bg, _ = _run(tmp_path / "bg.zarr", True, 1, OPTS["sgd-momentum"], edit_at=5)
    fg, _ = _run(tmp_path / "fg.zarr", False, 1, OPTS["sgd-momentum"], edit_at=5)
    for v in ("dist_init_layer", "update_norm_layer"):
        a, b = bg[v].values, fg[v].values
        assert np.isnan(a[5]).all() and np.isfinite(b[5]).all()
        keep = np.arange(20) != 5
        np.testing.assert_array_equal(a[keep], b[keep], err_msg=v)
    assert any("changed in place after the optimizer step" in n for n in bg.attrs["notes"])


def test_background_arguments(tmp_path):
    with pytest.raises(UsageError, match="background=True needs optimizer="):
        NoiseMonitor(nn.Linear(2, 2), "cross-entropy", tmp_path / "a.zarr", background=True)
    with pytest.raises(UsageError, match="background must be True, False or None"):
        NoiseMonitor(nn.Linear(2, 2), "cross-entropy", tmp_path / "b.zarr", background="yes")


@pytest.mark.parametrize("spare", [True, False])
def test_background_is_automatic_only_with_a_spare_core_and_an_optimizer(tmp_path, monkeypatch, spare):
    monkeypatch.setattr("gradlab.monitor.monitor.spare_core", lambda: spare)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "o.zarr", optimizer=opt) as mon:
        assert mon._dist.background is spare
    with NoiseMonitor(model, "cross-entropy", tmp_path / "n.zarr") as mon:
        assert mon._dist.background is False
    with NoiseMonitor(model, "cross-entropy", tmp_path / "d.zarr", optimizer=opt, distances=False) as mon:
        assert mon._dist.background is False


def test_spare_core_compares_torch_threads_with_this_process_cpus(monkeypatch):
    monkeypatch.setattr(distances_mod.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(distances_mod.torch, "get_num_threads", lambda: 4)
    assert distances_mod.spare_core() is False
    monkeypatch.setattr(distances_mod.torch, "get_num_threads", lambda: 2)
    assert distances_mod.spare_core() is True
