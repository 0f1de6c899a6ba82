"""A recorded step's arithmetic on the background worker (``background=True``, :mod:`gradlab.monitor.worker`): the
same store bit for bit as on the training thread (hooked Linear layers, Gram products of sequence inputs, the
torch.func fallback, gradient accumulation, both update-norm modes), in-place edits between steps found, and the
argument checks."""

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
from gradlab.monitor import worker as worker_mod

from .conftest import SeqNet

VARS = ("dist_init", "dist_init_layer", "update_norm", "update_norm_layer", "b_noise", "grad_sq_norm_layer")


def _mlp_batch(g):
    return torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def _seq_batch(g):
    return torch.randint(0, 11, (9, 5), generator=g), torch.randint(0, 3, (9,), generator=g)


def _run(path, background, every, make_opt, edit_at=None, steps=20, chunk_steps=8, seq=False, micro=1,
         distances=True, edit_input_at=None, width=16):
    torch.manual_seed(0)
    model = SeqNet().double() if seq else \
        nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)).double()
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    make_batch = _seq_batch if seq else _mlp_batch
    threads = set()
    measure = distances_mod.Distances.measure

    def spy(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return measure(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distances_mod.Distances, "measure", spy)
        with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, every=every, background=background,
                          chunk_steps=chunk_steps, distances=distances) as mon:
            for k in range(steps):
                opt.zero_grad()
                for _ in range(micro):
                    x, y = make_batch(g)
                    mon.loss((x, y)).backward()
                opt.step()
                if k == edit_at:
                    with torch.no_grad():
                        next(model.parameters()).mul_(0.99)
                if k == edit_input_at:  # the loop refills its input buffer in place (a static batch buffer)
                    x.mul_(0.5)
    return xr.open_zarr(path, consolidated=False).load(), threads


OPTS = {"sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}


CASES = {  # (every, optimizer, SeqNet, micro-batches per step, distances[, hidden width])
    "mlp-every1-momentum": (1, "sgd-momentum", False, 1, True),
    "mlp-every3-momentum": (3, "sgd-momentum", False, 1, True),
    "mlp-every1-adam": (1, "adam", False, 1, True),
    "mlp-every3-adam": (3, "adam", False, 1, True),
    "mlp-optimizer-mode": (1, "sgd", False, 1, "optimizer"),
    "mlp-accumulation": (1, "adam", False, 3, True),
    "seq-every1-adam": (1, "adam", True, 1, True),
    "seq-every2-accumulation": (2, "sgd-momentum", True, 2, True),
    "mlp-wide-blocks": (1, "adam", False, 1, True, 300),  # a 300×300 weight: the distances' pass in several blocks
}


@pytest.mark.parametrize("case", list(CASES))
def test_background_worker_writes_the_same_store_bit_for_bit(tmp_path, case):
    every, opt, seq, micro, dist, *width = CASES[case]
    kw = dict(seq=seq, micro=micro, distances=dist, width=width[0] if width else 16)
    if width:
        assert width[0] ** 2 > distances_mod.CHUNK
    bg, threads = _run(tmp_path / "bg.zarr", True, every, OPTS[opt], **kw)
    fg, fg_threads = _run(tmp_path / "fg.zarr", False, every, OPTS[opt], **kw)
    assert threads and all(t.startswith("gradlab-monitor-worker") for t in threads)
    assert fg_threads == {"MainThread"}
    assert int(bg.sizes["step"]) == 20 // every + (20 % every > 0)
    for v in VARS + ("gram_sum_layer", "gram_trace_layer", "missing", "loss"):
        np.testing.assert_array_equal(bg[v].values, fg[v].values, err_msg=v)
    assert (bg.missing.values == 0).all()
    assert np.isfinite(bg.update_norm.values).all() and np.isfinite(bg.dist_init.values).all()
    if seq:
        assert bg.attrs["fallback_params"] == ["scale"]  # the torch.func fallback ran, on the training thread
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
    assert any("parameter (or an optimizer buffer) was changed in place" in n for n in bg.attrs["notes"])


def test_an_input_buffer_edited_in_place_before_the_worker_is_checked_marks_the_step_missing(tmp_path):
    """The loop scales its batch tensor in place after step 5 (a reused input buffer): the first layer's input the
    worker read may have changed, so step 5 is missing 7 with NaN sums; the other steps equal the training-thread
    run's."""
    bg, _ = _run(tmp_path / "bg.zarr", True, 1, OPTS["adam"], edit_input_at=5)
    fg, _ = _run(tmp_path / "fg.zarr", False, 1, OPTS["adam"], edit_input_at=5)
    assert bg.missing.values[5] == 7 and (np.delete(bg.missing.values, 5) == 0).all()
    assert (fg.missing.values == 0).all()
    assert np.isnan(bg.gram_sum_layer.values[5]).all() and int(bg.nonfinite_count.values[5]) == 0
    keep = np.arange(20) != 5
    for v in ("gram_sum_layer", "gram_trace_layer", "dist_init_layer", "update_norm_layer"):
        np.testing.assert_array_equal(bg[v].values[keep], fg[v].values[keep], err_msg=v)
    np.testing.assert_array_equal(bg.dist_init_layer.values[5], fg.dist_init_layer.values[5])  # θ unchanged
    assert any("a layer input was changed in place" in n for n in bg.attrs["notes"])


class _NoFlatLinear(nn.Module):
    """A sequence model without a Linear on (B, d) (as the zoo gpt): the loss-terms check has nothing to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(11, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.proj(torch.tanh(self.emb(ids))).mean(1)  # (B, T, 3) -> (B, 3)


def test_norms_of_a_model_without_a_flat_linear_run_on_the_worker(tmp_path):
    """After the first recorded step the per-example norms of such a model are computed on the worker (they stayed
    on the training thread when the loss-terms check, which has nothing to compare here, was retried every step)."""
    from gradlab.monitor.norms import PerExampleNorms

    threads = []
    compute = PerExampleNorms.compute

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return compute(self, *args, **kwargs)

    torch.manual_seed(0)
    model = _NoFlatLinear().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PerExampleNorms, "compute", spy)
        with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, background=True) as mon:
            for _ in range(5):
                opt.zero_grad()
                mon.loss(_seq_batch(g)).backward()
                opt.step()
    assert threads[0] == "MainThread" and all(t.startswith("gradlab-monitor-worker") for t in threads[1:])
    assert len(threads) == 5
    ds = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert (ds.missing.values == 0).all()


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
        assert mon._background is spare
    with NoiseMonitor(model, "cross-entropy", tmp_path / "n.zarr") as mon:
        assert mon._background is False  # no optimizer step to wait at
    with NoiseMonitor(model, "cross-entropy", tmp_path / "d.zarr", optimizer=opt, distances=False) as mon:
        assert mon._background is spare  # the norms still run there


def test_spare_core_compares_torch_threads_with_this_process_cpus(monkeypatch):
    monkeypatch.setattr(worker_mod.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(worker_mod.torch, "get_num_threads", lambda: 4)
    assert worker_mod.spare_core() is False
    monkeypatch.setattr(worker_mod.torch, "get_num_threads", lambda: 2)
    assert worker_mod.spare_core() is True
