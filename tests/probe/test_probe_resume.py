"""Kill -9 mid-run, then --resume: the store equals an uninterrupted run's, value for value.  Dask workers too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradlab.cli import main
from gradlab.store import open_store
from probe_cases import assert_same_values, make_run


def _args(paths: dict[str, Path], out: Path, protocol: str) -> list[str]:
    return ["probe", "--checkpoint", str(paths["early"]), "--checkpoint", str(paths["late"]), "--data", "digits",
            "--batch-sizes", "1,2,4,8", "--budget", "8", "--trials", "5", "--trials-per-unit", "2",
            "--protocol", protocol, "--keep", "vectors", "--params", r"layers\.4\.", "--out", str(out)]


# units of trials [0,2) [2,4) [4,5) per checkpoint: done:K leaves K units done, write:K leaves K-1
@pytest.mark.parametrize(("protocol", "kill_at", "done_trials"),
                         [("frozen", "done:1", 2), ("frozen", "write:3", 4), ("step", "done:4", 7)])
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path, protocol, kill_at, done_trials):
    paths = make_run(tmp_path / "run")
    reference = tmp_path / "ref.zarr"
    assert main(_args(paths, reference, protocol)) == 0

    out = tmp_path / "killed.zarr"
    env = {**os.environ, "GRADLAB_PROBE_KILL_AFTER": kill_at}
    proc = subprocess.run([sys.executable, "-m", "gradlab", *_args(paths, out, protocol)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no cleanup ran
    ds = open_store(out, kind="probe")
    assert int(ds.done.values.sum()) == done_trials
    assert np.isnan(ds.grad_sq_norm.values).all() if protocol == "frozen" else True  # not finalized yet

    assert main([*_args(paths, out, protocol), "--resume"]) == 0
    assert open_store(out).done.values.all()
    assert_same_values(out, reference)


def test_dask_local_cluster_writes_the_same_store(tmp_path):
    from distributed import LocalCluster

    from gradlab.probe.run import resolve_config, run_probe

    paths = make_run(tmp_path / "run")
    config = resolve_config([str(paths["early"]), str(paths["late"])], data="digits", batch_sizes=[1, 2, 4, 8],
                            budget=8, trials=5, trials_per_unit=2, protocol="frozen", keep="vectors")
    run_probe(config, tmp_path / "local.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        summary = run_probe(config, tmp_path / "dask.zarr", scheduler=cluster.scheduler_address)
    assert summary.units_computed == 6
    assert_same_values(tmp_path / "dask.zarr", tmp_path / "local.zarr")
