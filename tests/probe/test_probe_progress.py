"""The probe's progress bar advances: per (trial, batch size) pair, within a unit, up to its total.

It never moved: the probe job did not call ``ctx.tick`` (the bar stood at 0/N until the run ended)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradlab.probe.job import ProbeJob
from gradlab.probe.run import resolve_config
from gradlab.runner import UnitContext
from probe_cases import make_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("protocol", ["frozen", "step"])
def test_a_unit_ticks_its_work_in_several_steps(run_dir, protocol):
    config = resolve_config([str(run_dir["late"])], data="digits", batch_sizes=[1, 4, 16], budget=16, trials=6,
                            trials_per_unit=6, protocol=protocol)
    job = ProbeJob(config)
    (unit,) = job.units()
    assert unit.work == 6 * 3  # (trial, batch size) pairs
    ticks: list[int] = []
    job.compute(job.state(), unit, UnitContext(tick=lambda n=1: ticks.append(n)))
    assert sum(ticks) == unit.work  # the bar reaches its total
    assert len(ticks) >= 3, ticks  # and moves within the unit (per trial / per block of step trials)


def test_probe_cli_progress_on_stderr_advances(run_dir, tmp_path):
    """A real ``gradlab probe`` with its bar on: stderr shows the count rising to the total, not only 0/N."""
    out = tmp_path / "p.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_MININTERVAL": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gradlab", "probe", "--checkpoint", str(run_dir["early"]),
                           "--checkpoint", str(run_dir["late"]), "--data", "digits", "--batch-sizes", "1,4,16",
                           "--budget", "16", "--trials", "4", "--trials-per-unit", "2", "--protocol", "frozen",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", proc.stderr)]
    assert counts, proc.stderr
    total = 2 * 4 * 3
    assert {b for _, b in counts} == {total}
    seen = sorted({a for a, _ in counts})
    assert seen[-1] == total and len(seen) >= 4, seen  # 0 → 24 through intermediate values
