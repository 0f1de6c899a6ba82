"""Concurrency: two writers started at the same instant on one new store (one refused with one line), two stores
written at once (both identical to lone runs), and analyze while a probe writes (the probe's store unharmed)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from campaign import Runner, leftovers, same_store
from reliability_cases import tiny_run


def _probe(paths: dict[str, Path], out: Path, trials: int = 8) -> list[str]:
    return ["probe", "--checkpoint", str(paths["early"]), "--checkpoint", str(paths["late"]), "--data", "digits",
            "--batch-sizes", "1,2,4,8,16", "--budget", "16", "--trials", str(trials), "--trials-per-unit", "1",
            "--protocol", "step", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = tmp_path_factory.mktemp("conc")
    runner = Runner(work)
    paths = tiny_run(work / "run")
    ref = work / "ref.zarr"
    assert runner.run(_probe(paths, ref)).rc == 0
    return runner, paths, ref, work


@pytest.mark.slow
def test_two_writers_at_the_same_instant_one_is_refused_with_one_line(setup):
    runner, paths, ref, work = setup
    out = work / "same.zarr"
    a, b = runner.start(_probe(paths, out)), runner.start(_probe(paths, out))
    ra, rb = runner.finish(a), runner.finish(b)
    codes = sorted([ra.rc, rb.rc])
    assert codes == [0, 2], (ra.stderr, rb.stderr)
    loser = ra if ra.rc == 2 else rb
    lines = loser.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error:"), loser.stderr
    assert "being written by another gradlab process" in lines[0] or "already exists" in lines[0]
    assert same_store(out, ref) == "" and leftovers(work / "same.zarr") == ""


@pytest.mark.slow
def test_two_stores_written_at_once_are_both_correct(setup):
    runner, paths, ref, work = setup
    a, b = runner.start(_probe(paths, work / "a.zarr")), runner.start(_probe(paths, work / "b.zarr"))
    assert runner.finish(a).rc == 0 and runner.finish(b).rc == 0
    assert same_store(work / "a.zarr", ref) == "" and same_store(work / "b.zarr", ref) == ""


@pytest.mark.slow
def test_analyze_while_a_probe_writes(setup):
    """The probe pauses itself (SIGSTOP) right after its first finished unit, so analyze surely runs while the probe
    holds the store: analyze reads the done trials, says the group was not written, exit 0; the probe then
    finishes a store identical to a lone run's."""
    import os
    import signal

    runner, paths, ref, work = setup
    out = work / "busy.zarr"
    handle = runner.start(_probe(paths, out), crash="store.done:1", signal="SIGSTOP")
    proc = handle[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the probe has stopped itself after its first unit
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            break
        time.sleep(0.02)
    assert state == "T"
    try:
        res = runner.run(["analyze", str(out), "--out", str(work / "busy-report"), "--n-boot", "0",
                          "--no-figures"])
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert res.rc == 0 and "Traceback" not in res.stderr, res.stderr
    assert "analysis group not written into the store" in res.stderr and "unfinished store" in res.stderr
    assert runner.finish(handle).rc == 0
    assert same_store(out, ref) == ""  # analyze never wrote into the store being written
