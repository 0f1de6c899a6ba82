"""The monitor store's durability (issue outcome 3): a training process killed at any moment leaves a store that a
plain ``xr.open_zarr(path)`` opens, holding every completed chunk; a kill loses at most one chunk in flight;
a normal exit (end of script, uncaught exception, KeyboardInterrupt) flushes; a resume continues the store with no
step twice, and a step missing only where it was never written, recorded as a gap (or refused)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import gradlab.monitor.store as store_mod
from gradlab.errors import UsageError
from gradlab.monitor import NoiseMonitor, open_monitor
from gradlab.monitor.writer import Appender

ROOT = Path(__file__).resolve().parents[2]
EXIT_SCRIPT = Path(__file__).with_name("exit_script.py")
G = torch.Generator().manual_seed(3)
DATA = [(torch.randn(8, 3, generator=G, dtype=torch.float64), torch.randint(0, 2, (8,), generator=G))
        for _ in range(16)]
CHECKED = ("step", "loss", "examples_seen", "missing", "b_noise", "grad_sq_norm_layer", "dist_init")


def _fresh():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(mon, opt, steps):
    for t in steps:
        opt.zero_grad()
        mon.loss(DATA[t]).backward()
        opt.step()


def _die(mon):
    """The run dies: nothing of the monitor runs any more (what it had not submitted is lost)."""
    mon._rows = []
    mon._abandon()


def _reference(path, steps=8, chunk_steps=2):
    model, opt = _fresh()
    with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=chunk_steps) as mon:
        _train(mon, opt, range(steps))
    return xr.open_zarr(path).load()


def _plain_open(path):
    """``xr.open_zarr(path)`` as a user types it, quietly (no consolidated-metadata warning, no error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(path)


def _same_prefix(ds, ref, n):
    assert ds.sizes["step"] == n
    for name in CHECKED:
        got, want = ds[name].values, ref[name].values[:n]
        assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), name


class _Snapshots:
    """Copies of the store just before each of its file writes (every write is a rename, so a hard-linked copy
    holds exactly what a kill at that moment leaves)."""

    def __init__(self, monkeypatch, store: Path, folder: Path, attrs_midway: list | None = None) -> None:
        self.store, self.folder, self.taken, self.on = store, folder, [], False
        self.attrs_midway = attrs_midway  # [MonitorStore]: an attrs write between the arrays' length updates
        real = store_mod._atomic_write

        def spy(target, data):
            target = Path(target)
            if self.on and target.is_relative_to(self.store):
                rel = target.relative_to(self.store)
                if self.attrs_midway and rel.name == "zarr.json" and len(rel.parts) == 2:
                    self.attrs_midway[0].set_attrs({"written_meanwhile": len(self.taken)})
                dst = self.folder / str(len(self.taken))
                shutil.copytree(self.store, dst, copy_function=os.link)
                self.taken.append((dst, str(rel)))
            real(target, data)

        monkeypatch.setattr(store_mod, "_atomic_write", spy)


def test_a_kill_at_any_moment_of_an_append_leaves_a_store_plain_xarray_opens(tmp_path, monkeypatch):
    """Every moment of an append (its chunk files, each array's length, the commit), with an attrs write (a note)
    landing between the arrays' length updates: plain xr.open_zarr opens the store at the last committed append,
    every array the same length, the data those steps' bit for bit; a resume from a store killed inside the
    metadata updates continues it into the uninterrupted run's store."""
    ref = _reference(tmp_path / "ref.zarr")
    path = tmp_path / "m.zarr"
    model, opt = _fresh()
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=2)
    snaps = _Snapshots(monkeypatch, path, tmp_path / "snaps", attrs_midway=[mon.store])
    _train(mon, opt, range(2))
    mon.flush()
    state = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
    snaps.on = True
    _train(mon, opt, range(2, 4))  # the second chunk: appended in the background, every write copied
    mon.flush()
    snaps.on = False
    _train(mon, opt, range(4, 8))
    mon.close()
    kinds = {rel.split("/")[-1] if rel != "zarr.json" else "root" for _, rel in snaps.taken}
    assert {"zarr.json", "root", "0", "1"} <= kinds and len(snaps.taken) > 100
    mixed = []
    for dst, rel in snaps.taken:
        ds = _plain_open(dst)
        n = ds.sizes["step"]
        assert n in (2, 4), (rel, n)
        _same_prefix(ds, ref, n)
        lengths = {json.loads((dst / v / "zarr.json").read_text())["shape"][0] for v in ("loss", "step", "b_noise")}
        if len(lengths) > 1:
            mixed.append(dst)  # the arrays' own lengths differ here: only the commit record is consistent
    assert mixed, "no snapshot inside the metadata updates"
    assert open_monitor(mixed[0]).sizes["step"] == 2
    with pytest.raises(ValueError, match="conflicting sizes"):  # the one reader that skips the commit record
        xr.open_zarr(mixed[0], consolidated=False)

    monkeypatch.undo()
    killed = tmp_path / "killed.zarr"
    shutil.copytree(mixed[len(mixed) // 2], killed)
    model, opt = _fresh()
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    with NoiseMonitor(model, "cross-entropy", killed, optimizer=opt, chunk_steps=2, resume=True,
                      start_step=2) as mon:
        assert xr.open_zarr(killed, consolidated=False).sizes["step"] == 2  # every array set back to the commit
        _train(mon, opt, range(2, 8))
    got = xr.open_zarr(killed).load()
    for name in ref.data_vars:
        if name != "wall_time":
            assert np.array_equal(got[name].values, ref[name].values, equal_nan=True), name


def test_a_kill_at_any_moment_of_a_resume_truncation_leaves_the_old_or_the_new_length(tmp_path, monkeypatch):
    ref = _reference(tmp_path / "ref.zarr")
    path = tmp_path / "m.zarr"
    shutil.copytree(tmp_path / "ref.zarr", path)
    snaps = _Snapshots(monkeypatch, path, tmp_path / "snaps")
    snaps.on = True
    model, opt = _fresh()
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=2, resume=True, start_step=3)
    snaps.on = False
    mon.close()
    assert len(snaps.taken) > 20
    mixed = []
    for dst, rel in snaps.taken:
        ds = _plain_open(dst)
        assert ds.sizes["step"] in (8, 3), rel
        _same_prefix(ds, ref, ds.sizes["step"])
        if json.loads((dst / "step" / "zarr.json").read_text())["shape"][0] != ds.sizes["step"]:
            mixed.append(dst)  # every array already shortened, the commit not yet written
    assert mixed, "no snapshot inside the truncation's metadata updates"

    # killed there, the store still holds its 8 committed steps: a resume from a checkpoint at step 5 keeps 0..4
    # (the arrays already shortened to 3 are set back to the commit first)
    monkeypatch.undo()
    model, opt = _fresh()
    mon = NoiseMonitor(model, "cross-entropy", mixed[0], optimizer=opt, chunk_steps=2, resume=True, start_step=5)
    mon.close()
    _same_prefix(_plain_open(mixed[0]), ref, 5)


def _exit_run(out: Path, steps: int, mode: str, at: int, chunk: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXIT_SCRIPT), str(out), str(steps), mode, str(at), str(chunk)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_os_exit_in_a_fast_loop_loses_at_most_one_chunk_and_leaves_a_plain_readable_store(tmp_path):
    """``os._exit`` (as ``kill -9``: no Python cleanup) right after step 300 of a loop that fills a 2-step chunk
    faster than the background thread writes one: the store opens with plain xr.open_zarr and holds every step but
    those of the chunk in flight and the buffered ones (< 2 chunks), not a queue of unwritten chunks."""
    chunk, at = 2, 300
    r = _exit_run(tmp_path / "m.zarr", 400, "os_exit", at, chunk)
    assert r.returncode == 0, r.stderr
    ds = _plain_open(tmp_path / "m.zarr")
    n = ds.sizes["step"]
    assert list(ds.step.values) == list(range(n)) and n % chunk == 0
    assert at + 1 - (2 * chunk - 1) <= n <= at + 1, n
    assert np.isfinite(ds.loss.values).all()


EXIT_STEPS = 9  # flushed after step 5: the append at exit rewrites a partial chunk


@pytest.fixture(scope="module")
def closed_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("exit") / "ref.zarr"
    r = _exit_run(path, EXIT_STEPS, "close", -1, 4)
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.parametrize("mode", ["return", "interrupt"])
def test_a_script_that_ends_without_close_or_by_an_exception_keeps_every_closed_step(tmp_path, mode, closed_run):
    """The end of a script that never calls close(), and an uncaught exception (KeyboardInterrupt): the monitor is
    closed at exit, its buffered steps written and the store finished (consolidated), equal to a closed run's."""
    steps = EXIT_STEPS
    r = _exit_run(tmp_path / "m.zarr", steps if mode == "return" else 100, mode, steps - 1, 4)
    assert (r.returncode == 0) == (mode == "return"), r.stderr
    if mode == "interrupt":
        assert "KeyboardInterrupt" in r.stderr
    got, want = _plain_open(tmp_path / "m.zarr").load(), _plain_open(closed_run).load()
    assert list(got.step.values) == list(range(steps))
    for name in want.data_vars:
        if name != "wall_time":
            assert np.array_equal(got[name].values, want[name].values, equal_nan=True), name


def test_the_appender_keeps_at_most_one_chunk_in_flight():
    written, started = [], threading.Event()

    def slow(rows):
        started.set()
        time.sleep(0.2)
        written.append(rows["step"][0])

    app = Appender(slow)
    app.submit({"step": np.array([0])})
    started.wait(5)
    app.submit({"step": np.array([1])})  # waits for the first: it is on disk when this returns
    assert written == [0]
    app.shutdown()
    assert written == [0, 1]


def _unflushed_run(path, steps, ckpt_at, chunk_steps, every=1):
    """Train ``steps`` steps, take a checkpoint at ``ckpt_at`` without flushing the monitor, die."""
    model, opt = _fresh()
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=chunk_steps, every=every)
    _train(mon, opt, range(ckpt_at))
    mon._appender.wait()  # (the background appends of full chunks have finished: deterministic)
    state = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
    _train(mon, opt, range(ckpt_at, steps))
    mon._appender.wait()
    _die(mon)
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    return model, opt


def _gaps(path):
    return json.loads(_plain_open(path).attrs.get("gaps", "[]"))


def test_a_resume_past_the_stores_end_records_the_gap_in_an_empty_store(tmp_path, caplog):
    """The checkpoint at step 8 was saved without monitor.flush() and no chunk of 128 steps was full: the store
    holds no step.  The resume continues, the gap 0..7 is recorded (gaps attr, note, warning), never silent."""
    path = tmp_path / "m.zarr"
    model, opt = _unflushed_run(path, 10, 8, chunk_steps=128)
    assert _plain_open(path).sizes["step"] == 0
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, resume=True, start_step=8)
    assert "the store holds no step but training resumes at step 8: recorded steps 0..7 were never written" in \
        caplog.text
    _train(mon, opt, range(8, 12))
    mon.close()
    ds = _plain_open(path)
    assert list(ds.step.values) == [8, 9, 10, 11]
    assert _gaps(path) == [{"first": 0, "last": 7, "every": 1, "resumed_at": 8,
                            "reason": "not flushed before the checkpoint was saved"}]
    assert any("recorded steps 0..7 were never written" in note for note in ds.attrs["notes"])


def test_a_resume_past_the_stores_end_is_refused_with_on_gap_raise_and_recorded_by_default(tmp_path, caplog):
    path = tmp_path / "m.zarr"
    model, opt = _unflushed_run(path, 10, 10, chunk_steps=4)  # chunks 0..3, 4..7 written; 8, 9 buffered, lost
    assert list(_plain_open(path).step.values) == list(range(8))
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    root_attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    with pytest.raises(UsageError, match=r"the store ends at step 7 but training resumes at step 10: recorded "
                                         r"steps 8\.\.9 were never written .*call monitor\.flush\(\) .*resume from "
                                         r"a checkpoint at step ≤ 8, or pass on_gap='warn'"):
        NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=4, resume=True, start_step=10,
                     on_gap="raise")
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()  # refused: no step, attr or note written (the commit record rewritten)
    assert all(after[k] == before[k] for k in after if k.name != "zarr.json" or len(k.parts) > 1)
    assert json.loads((path / "zarr.json").read_text())["attributes"] == root_attrs
    with pytest.raises(UsageError, match="on_gap must be one of"):
        NoiseMonitor(model, "cross-entropy", path, optimizer=opt, resume=True, start_step=10, on_gap="ignore")
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=4, resume=True, start_step=10)
    assert "recorded steps 8..9 were never written" in caplog.text
    _train(mon, opt, range(10, 14))
    mon.close()
    assert list(_plain_open(path).step.values) == [*range(8), *range(10, 14)]
    assert [(g["first"], g["last"], g["resumed_at"]) for g in _gaps(path)] == [(8, 9, 10)]

    # a later resume from an older checkpoint, inside the gap: steps from it on are dropped, the gap shrinks
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=4, resume=True, start_step=9)
    mon.close()
    ds = _plain_open(path)
    assert list(ds.step.values) == list(range(8))
    assert [(g["first"], g["last"], g["resumed_at"]) for g in _gaps(path)] == [(8, 8, 9)]
    assert any("the 4 recorded steps 10..13 written after that checkpoint were dropped" in n for n in ds.attrs["notes"])


def test_a_gap_with_every_names_the_recorded_steps(tmp_path):
    path = tmp_path / "m.zarr"
    model, opt = _unflushed_run(path, 14, 14, chunk_steps=2, every=3)  # recorded 0, 3 | 6, 9 | 12 buffered
    with pytest.raises(UsageError, match=r"ends at step 9 but training resumes at step 14: recorded steps 12\.\.12 "
                                         r"\(every 3 steps\) were never written"):
        NoiseMonitor(model, "cross-entropy", path, optimizer=opt, every=3, chunk_steps=2, resume=True,
                     start_step=14, on_gap="raise")
    NoiseMonitor(model, "cross-entropy", path, optimizer=opt, every=3, chunk_steps=2, resume=True,
                 start_step=12, on_gap="raise").close()  # a checkpoint at 12: step 12 not taken yet, no gap


def test_state_dict_at_each_checkpoint_keeps_store_and_checkpoint_consistent(tmp_path, caplog):
    """monitor.state_dict() in the checkpoint flushes the store: a resume from that checkpoint, after the run
    wrote more steps and died, drops those (noted) and continues without a gap or a step twice, equal to the
    uninterrupted run."""
    ref = _reference(tmp_path / "ref.zarr", steps=12, chunk_steps=4)
    path = tmp_path / "m.zarr"
    model, opt = _fresh()
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=4)
    _train(mon, opt, range(6))
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
            "monitor": mon.state_dict()}
    assert ckpt["monitor"]["step"] == 6 and list(_plain_open(path).step.values) == list(range(6))
    _train(mon, opt, range(6, 11))  # 6..9 fill a chunk (written in the background), 10 is buffered
    mon._appender.wait()
    _die(mon)
    assert list(_plain_open(path).step.values) == list(range(10))
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, chunk_steps=4, resume=True,
                           start_step=ckpt["monitor"]["step"], on_gap="raise")
    assert not caplog.records  # nothing missing
    _train(mon, opt, range(6, 12))
    mon.close()
    got = _plain_open(path).load()
    assert list(got.step.values) == list(range(12))
    for name in ref.data_vars:
        if name != "wall_time":
            assert np.array_equal(got[name].values, ref[name].values, equal_nan=True), name
    assert "gaps" not in got.attrs
    assert any("resumed at step 6, before the store's end: the 4 recorded steps 6..9 written after that checkpoint "
               "were dropped" in note for note in got.attrs["notes"])
