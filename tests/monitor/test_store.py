"""The monitor store: chunked appends readable while training, kill -9 at any moment, resume without gaps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.errors import UsageError
from gradlab.monitor import NoiseMonitor, open_monitor

SCRIPT = Path(__file__).with_name("train_script.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), str(steps), *extra], capture_output=True,
                          text=True, env=env, timeout=300, check=True)


@pytest.mark.slow
def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    from .train_script import main

    main([str(ref_dir), "20"])  # the uninterrupted reference, in this process
    ref = xr.open_zarr(ref_dir / "run.zarr", consolidated=False).load()
    assert list(ref.step.values) == list(range(20))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), "20", "--sleep", "0.15"],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # kill while training, after the second checkpoint (step 12) and one more step
        if int(line) >= 13:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    mid = xr.open_zarr(run_dir / "run.zarr", consolidated=False)  # opens as is, with whole chunks only
    n = mid.sizes["step"]
    assert n >= 12 and list(mid.step.values) == list(range(n))
    assert np.isfinite(mid.grad_sq_norm.values).all()

    _run(run_dir, 20, "--resume")
    got = xr.open_zarr(run_dir / "run.zarr", consolidated=False).load()
    assert list(got.step.values) == list(range(20))  # no step missing, none twice
    for name in ("grad_sq_norm", "trace_cov", "b_noise", "b_noise_low", "update_norm", "dist_init", "loss"):
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)


def test_readable_while_training_and_after_partial_flush(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, chunk_steps=3)
    seen = 0
    for t in range(7):
        opt.zero_grad()
        mon.loss((x, y)).backward()
        opt.step()
        ds = open_monitor(tmp_path / "m.zarr")  # opens at any moment, at the length every array has reached
        n = ds.sizes["step"]  # full chunks are appended in the background: visible once written
        assert n % 3 == 0 and seen <= n <= 3 * ((t + 1) // 3)
        seen = n
    mon.flush()  # a partial chunk, and waits for the background appends
    assert xr.open_zarr(tmp_path / "m.zarr", consolidated=False).sizes["step"] == 7
    for _ in range(2):
        opt.zero_grad()
        mon.loss((x, y)).backward()
        opt.step()
    mon.close()
    ds = open_monitor(tmp_path / "m.zarr")
    assert list(ds.step.values) == list(range(9)) and ds.attrs["gradlab_store"] == "monitor"


def _edit_json(path: Path, edit) -> None:
    import json

    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("record", [True, False])
def test_a_store_caught_between_metadata_updates_is_read_at_the_committed_length(tmp_path, record):
    """A kill inside the metadata updates of an append: some arrays' own zarr.json already extended, the commit
    record (the root's consolidated metadata) not yet.  Plain xr.open_zarr and open_monitor read the last committed
    append; a resume sets every array back to it.  ``record=False``: a store of an older gradlab, without a commit
    record, is read at the common length of its arrays."""
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    path = tmp_path / "m.zarr"
    with NoiseMonitor(model, "cross-entropy", path, chunk_steps=2) as mon:
        for _ in range(4):
            mon.loss((x, y)).backward()
            mon.step()

    def committed_at_two(root):
        for name, m in root["consolidated_metadata"]["metadata"].items():
            if (m.get("dimension_names") or [None])[0] == "step":
                m["shape"][0] = 2

    _edit_json(path / "zarr.json", committed_at_two if record else lambda root: root.pop("consolidated_metadata"))
    _edit_json(path / "loss" / "zarr.json", lambda m: m["shape"].__setitem__(0, 2))  # the others say 4
    if record:
        assert list(xr.open_zarr(path).step.values) == [0, 1]
    ds = open_monitor(path, retries=1)
    assert ds.sizes["step"] == 2 and list(ds.step.values) == [0, 1]
    mon = NoiseMonitor(model, "cross-entropy", path, resume=True, start_step=2, chunk_steps=2)
    assert xr.open_zarr(path, consolidated=False).sizes["step"] == 2  # every array's own length set back
    mon.close()
    assert xr.open_zarr(path, consolidated=False).sizes["step"] == xr.open_zarr(path).sizes["step"] == 2


def test_refuses_other_data_and_an_existing_store(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    model = nn.Linear(3, 2)
    with pytest.raises(UsageError, match="holds other data"):
        NoiseMonitor(model, "cross-entropy", tmp_path / "other")
    with pytest.raises(UsageError, match="holds other data"):
        NoiseMonitor(model, "cross-entropy", tmp_path / "other", resume=True, start_step=0)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr") as mon:  # one recorded step: a store to keep
        mon.loss((torch.randn(4, 3), torch.randint(0, 2, (4,)))).backward()
        mon.step()
    with pytest.raises(UsageError, match="already holds a gradlab monitor store"):
        NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr")
    with pytest.raises(UsageError, match="another monitor config"):
        NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", every=2, resume=True, start_step=0)


def test_resume_drops_steps_after_the_checkpoint_and_replays_the_averages(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(12)]

    def train(mon, steps):
        for t in steps:
            opt.zero_grad()
            mon.loss(data[t]).backward()
            opt.step()

    ref_model = nn.Linear(3, 2).double()
    ref_model.load_state_dict(model.state_dict())
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, chunk_steps=4)
    train(mon, range(6))
    mon.flush()
    state = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
    train(mon, range(6, 9))
    mon.flush()  # steps 6..8 reach the store, then the run dies (no close): nothing of it runs any more
    for h in mon._handles:
        h.remove()
    mon.hooks.remove()
    mon.store.close()
    mon.closed = True  # dead: nothing of it runs any more
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, chunk_steps=4, resume=True,
                       start_step=6)
    train(mon, range(6, 12))
    mon.close()
    got = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    assert list(got.step.values) == list(range(12))

    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    model, opt = ref_model, ref_opt
    with NoiseMonitor(model, "cross-entropy", tmp_path / "ref.zarr", optimizer=opt, chunk_steps=4) as ref_mon:
        train(ref_mon, range(12))
    ref = xr.open_zarr(tmp_path / "ref.zarr", consolidated=False)
    for name in ("grad_sq_norm", "b_noise", "b_noise_high", "dist_init", "examples_seen"):
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)


def test_a_second_writer_is_refused_and_the_lock_file_goes_at_close(tmp_path):
    from gradlab.monitor.store import lock_file

    model = nn.Linear(3, 2)
    path = tmp_path / "m.zarr"
    first = NoiseMonitor(model, "cross-entropy", path)
    code = ("from torch import nn; from gradlab.monitor import NoiseMonitor; "
            f"NoiseMonitor(nn.Linear(3, 2), 'cross-entropy', {str(path)!r}, resume=True, start_step=0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "being written by another process" in r.stderr
    first.close()
    assert not lock_file(path).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]
    NoiseMonitor(model, "cross-entropy", path, resume=True, start_step=0).close()


def test_a_failed_background_append_is_raised_not_lost(tmp_path, monkeypatch):
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    mon = NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", chunk_steps=2)

    def broken(rows):
        raise OSError("disk full")

    monkeypatch.setattr(mon._appender, "_append", broken)
    for _ in range(2):  # a full chunk: submitted to the background thread, which fails
        mon.loss((x, y)).backward()
        mon.step()
    with pytest.raises(OSError, match="disk full"):
        mon.flush()
    monkeypatch.undo()
    mon.close()


def test_a_finished_store_opens_quietly_and_a_resumed_one_never_shows_stale_steps(tmp_path):
    """After close() plain xr.open_zarr(path) opens without xarray's consolidated-metadata warning (the README's
    promise for every finished store); a resumed writer keeps that metadata current (it is the store's commit
    record), so a plain open while it appends (or after it truncated) opens quietly too and never reads the old
    lengths."""
    import warnings

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "m.zarr"

    def steps(mon, k):
        for _ in range(k):
            opt.zero_grad()
            mon.loss((torch.randn(4, 3), torch.randint(0, 2, (4,)))).backward()
            opt.step()

    with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=2) as mon:
        steps(mon, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(path).sizes["step"] == 5
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=2, resume=True, start_step=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert xr.open_zarr(path).sizes["step"] == 3  # truncated to the checkpoint, not the stale 5
        steps(mon, 4)
    finally:
        mon.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path)
    assert list(ds.step.values) == list(range(7))


@pytest.mark.parametrize("flushed", [True, False])
def test_resume_with_every_counts_the_examples_of_unrecorded_steps(tmp_path, flushed, caplog):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5 + t % 3, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5 + t % 3,),
             generator=g)) for t in range(14)]

    def run(path, steps, mon_kw, model, opt, close=True):
        mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, every=3, **mon_kw)
        for t in steps:
            opt.zero_grad()
            mon.loss(data[t]).backward()
            opt.step()
        if close:
            mon.close()
        return mon

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    run(tmp_path / "ref.zarr", range(14), {}, *fresh())
    model, opt = fresh()
    mon = run(tmp_path / "m.zarr", range(8), {}, model, opt, close=False)
    if flushed:
        mon.flush()  # before the checkpoint at step 8 (steps 6, 7 done; 7 not recorded)
    mon._submit()
    mon._appender.shutdown()
    for h in mon._handles:
        h.remove()
    mon.hooks.remove()
    mon.store.close()  # the run dies
    mon.closed = True
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        run(tmp_path / "m.zarr", range(8, 14), {"resume": True, "start_step": 8}, model, opt)
    got = xr.open_zarr(tmp_path / "m.zarr", consolidated=False)
    ref = xr.open_zarr(tmp_path / "ref.zarr", consolidated=False)
    assert list(got.step.values) == list(ref.step.values) == [0, 3, 6, 9, 12]
    if flushed:
        np.testing.assert_array_equal(got.examples_seen.values, ref.examples_seen.values)
        assert "leaves out" not in caplog.text
    else:  # the count cannot be known: -1 (never a wrong count), said in the log and the store's notes
        np.testing.assert_array_equal(got.examples_seen.values[:3], ref.examples_seen.values[:3])
        assert (got.examples_seen.values[3:] == -1).all()
        assert "examples_seen from step 8 on is not known" in caplog.text
        assert any("examples_seen= " in note for note in got.attrs["notes"])


def test_a_new_monitor_in_the_same_process_closes_the_earlier_one_of_its_store_or_model(tmp_path, caplog):
    """A notebook cell run again after an error: the earlier monitor (still hooked, holding the store's lock) is
    closed with a warning, its completed steps kept; its hooks record nothing more.  One whose store folder was
    removed is released without writing."""
    import shutil

    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "m.zarr"
    first = NoiseMonitor(model, "cross-entropy", path, optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        first.loss((x, y)).backward()
        opt.step()
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with pytest.raises(UsageError, match="already holds a gradlab monitor store"):
            NoiseMonitor(model, "cross-entropy", path, optimizer=opt)  # its 2 steps were flushed at close
    assert first.closed and "closing the earlier NoiseMonitor" in caplog.text
    assert list(xr.open_zarr(path, consolidated=False).step.values) == [0, 1]
    second = NoiseMonitor(model, "cross-entropy", tmp_path / "n.zarr", optimizer=opt)
    shutil.rmtree(tmp_path / "n.zarr")  # the user removes the store of the failed cell and runs it again
    third = NoiseMonitor(model, "cross-entropy", tmp_path / "n.zarr", optimizer=opt)
    assert second.closed and not third.closed
    for _ in range(3):
        opt.zero_grad()
        third.loss((x, y)).backward()
        opt.step()
    third.close()
    ds = xr.open_zarr(tmp_path / "n.zarr", consolidated=False)
    assert list(ds.step.values) == [0, 1, 2] and (ds.missing.values == 0).all()
