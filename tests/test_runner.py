"""The one runner (gradlab.runner) on a toy job and on the real commands: local and Dask runs write the same store,
a resume recomputes only undone units, a changed config or input file is refused, live objects stay local, units
run with the store's thread count and Dask results land in their own units whatever order they finish in."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from gradlab.errors import StoreError, UsageError
from gradlab.runner import Job, Template, Unit, UnitContext, run_job
from gradlab.store import VarSpec

CALLS: list[int] = []


@dataclass(frozen=True)
class SquaresJob(Job):
    """x[u, k] = (seed + u)² + k, unit u = one row; ``total`` = Σ x, written by finalize."""

    n: int = 5
    seed: int = 0
    input_file: str = ""
    kind: ClassVar[str] = "toy"

    def config_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "input": self.input_file}

    def input_files(self):
        return [self.input_file] if self.input_file else []

    def template(self) -> Template:
        return Template(sizes={"u": self.n, "k": 3}, coords={"u": ("u", np.arange(self.n), {"long_name": "unit"})},
                        variables=[VarSpec("x", ("u", "k"), "float64", "a value", "1"),
                                   VarSpec("total", (), "float64", "sum of x", "1")],
                        unit_dims=("u",), chunks={"u": 1})

    def units(self):
        return [Unit({"u": u}, f"row {u}") for u in range(self.n)]

    def prepare(self) -> Any:
        return {"offset": np.arange(3.0)}

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        CALLS.append(int(unit.region["u"]))
        return {"x": float((self.seed + unit.region["u"]) ** 2) + state["offset"]}

    def finalize(self, writer: Any, ctx: UnitContext) -> None:
        writer.write("total", {}, writer.read("x").sum())


def _values(path):
    import xarray as xr

    ds = xr.open_zarr(path, consolidated=False)
    return ds.x.values, float(ds.total.values), ds.done.values


def test_local_run_resume_and_refusals(tmp_path):
    CALLS.clear()
    s = run_job(SquaresJob(), tmp_path / "a.zarr", progress=False)
    x, total, done = _values(tmp_path / "a.zarr")
    np.testing.assert_array_equal(x, (np.arange(5.0) ** 2)[:, None] + np.arange(3.0))
    assert total == x.sum() and done.all() and s.units_computed == 5 and CALLS == [0, 1, 2, 3, 4]
    with pytest.raises(StoreError, match="already exists; pass --resume"):
        run_job(SquaresJob(), tmp_path / "a.zarr", progress=False)
    CALLS.clear()
    assert run_job(SquaresJob(), tmp_path / "a.zarr", resume=True, progress=False).units_computed == 0
    assert CALLS == []
    with pytest.raises(StoreError, match="different config"):
        run_job(SquaresJob(seed=1), tmp_path / "a.zarr", resume=True, progress=False)


def test_a_changed_input_file_is_refused_on_resume(tmp_path):
    f = tmp_path / "input.bin"
    f.write_bytes(b"one")
    job = SquaresJob(input_file=str(f))
    run_job(job, tmp_path / "a.zarr", progress=False)
    run_job(job, tmp_path / "a.zarr", resume=True, progress=False)  # unchanged: fine
    f.write_bytes(b"two")
    with pytest.raises(StoreError, match="changed since"):
        run_job(job, tmp_path / "a.zarr", resume=True, progress=False)


def test_resume_recomputes_exactly_the_undone_units(tmp_path):
    import zarr

    run_job(SquaresJob(), tmp_path / "a.zarr", progress=False)
    g = zarr.open_group(tmp_path / "a.zarr", mode="r+")
    g["done"][1] = False
    g["done"][3] = False
    g["x"][1] = -1.0  # what a crash between write and mark_done could leave
    CALLS.clear()
    run_job(SquaresJob(), tmp_path / "a.zarr", resume=True, progress=False)
    assert CALLS == [1, 3]
    run_job(SquaresJob(), tmp_path / "b.zarr", progress=False)
    for a, b in zip(_values(tmp_path / "a.zarr"), _values(tmp_path / "b.zarr")):
        np.testing.assert_array_equal(a, b)



@dataclass(frozen=True)
class CountingJob(SquaresJob):
    """SquaresJob that records which units it skips and when its state is prepared."""

    log: ClassVar[list[str]] = []

    def prepare(self) -> Any:
        self.log.append("prepare")
        return super().prepare()

    def on_skip(self, unit: Unit, ctx: UnitContext) -> None:
        self.log.append(f"skip {unit.region['u']}")


def test_resume_skips_held_units_in_order_and_prepares_only_to_compute(tmp_path):
    """A fresh process resuming a complete store loads nothing (finalize does not need the state); one with undone
    units prepares once; held units are reported in unit order."""
    import zarr

    from gradlab.runner import dispatch

    run_job(CountingJob(), tmp_path / "a.zarr", progress=False)
    dispatch._STATES.clear()  # what a new process (a later --resume) starts with
    CountingJob.log.clear()
    assert run_job(CountingJob(), tmp_path / "a.zarr", resume=True, progress=False).units_computed == 0
    assert CountingJob.log == [f"skip {u}" for u in range(5)]
    zarr.open_group(tmp_path / "a.zarr", mode="r+")["done"][2] = False
    dispatch._STATES.clear()
    CountingJob.log.clear()
    assert run_job(CountingJob(), tmp_path / "a.zarr", resume=True, progress=False).units_computed == 1
    assert CountingJob.log == ["skip 0", "skip 1", "skip 3", "skip 4", "prepare"]

def test_dask_scheduler_writes_the_same_store(tmp_path):
    from distributed import LocalCluster

    run_job(SquaresJob(n=7), tmp_path / "local.zarr", progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        s = run_job(SquaresJob(n=7), tmp_path / "dask.zarr", scheduler=cluster.scheduler_address, progress=False)
    assert s.units_computed == 7
    for a, b in zip(_values(tmp_path / "local.zarr"), _values(tmp_path / "dask.zarr")):
        np.testing.assert_array_equal(a, b)



@dataclass(frozen=True)
class SlowFirstJob(SquaresJob):
    """SquaresJob whose earlier units take longer: on two Dask workers they finish out of submission order."""

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        import time

        time.sleep(0.3 * (self.n - 1 - int(unit.region["u"])))
        return super().compute(state, unit, ctx)


def test_dask_results_finishing_out_of_order_are_written_to_their_own_units(tmp_path):
    from distributed import LocalCluster

    run_job(SquaresJob(n=4), tmp_path / "local.zarr", progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        run_job(SlowFirstJob(n=4), tmp_path / "dask.zarr", scheduler=cluster.scheduler_address, progress=False)
    for a, b in zip(_values(tmp_path / "local.zarr"), _values(tmp_path / "dask.zarr")):
        np.testing.assert_array_equal(a, b)


@dataclass(frozen=True)
class ThreadsJob(SquaresJob):
    """x[u, :] = the torch thread count unit u ran with."""

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        import torch

        return {"x": np.full(3, float(torch.get_num_threads()))}


def test_units_run_with_the_thread_count_the_store_records(tmp_path, monkeypatch):
    import torch
    import xarray as xr

    import gradlab.runner.run as runner_run

    mine = torch.get_num_threads()
    monkeypatch.setattr(runner_run, "default_threads", lambda workers=None: mine + 1)
    run_job(ThreadsJob(n=2), tmp_path / "a.zarr", progress=False)
    ds = xr.open_zarr(tmp_path / "a.zarr", consolidated=False)
    assert int(ds.attrs["torch_threads"]) == mine + 1
    assert (ds.x.values == mine + 1).all() and torch.get_num_threads() == mine  # restored after the units

def test_dispatch_flags_are_checked(tmp_path):
    with pytest.raises(UsageError, match="--workers must be >= 1"):
        run_job(SquaresJob(), tmp_path / "a.zarr", workers=0)
    with pytest.raises(UsageError, match="not both"):
        run_job(SquaresJob(), tmp_path / "a.zarr", workers=2, scheduler="tcp://127.0.0.1:1")
    assert not (tmp_path / "a.zarr").exists()


def test_train_and_sharpness_on_dask_workers_equal_local_runs(tmp_path):
    """The real commands through the same runner: a train grid and a sharpness store computed by Dask worker
    processes are the stores of the local runs (data bitwise)."""
    from distributed import LocalCluster

    from gradlab.cli import main

    train = ["train", "--model-kwargs", '{"widths": [8]}', "--batch-sizes", "128,512", "--epochs", "1",
             "--checkpoint-epochs", "1", "--no-progress"]
    assert main([*train, "--out", str(tmp_path / "t_local")]) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert main([*train, "--out", str(tmp_path / "t_dask"), "--scheduler", cluster.scheduler_address]) == 0
        ck = sorted((tmp_path / "t_local" / "runs").glob("*/epoch001.pt"))
        sharp = ["sharpness", *sum((["--checkpoint", str(c)] for c in ck), []), "--samples", "32", "--top-k", "1",
                 "--hutchinson-probes", "4", "--eps", "1e-3", "--lbfgs-iters", "2", "--no-progress"]
        assert main([*sharp, "--out", str(tmp_path / "s_dask.zarr"), "--scheduler", cluster.scheduler_address]) == 0
    assert main([*sharp, "--out", str(tmp_path / "s_local.zarr")]) == 0
    import xarray as xr

    for a, b in (("t_local/train.zarr", "t_dask/train.zarr"), ("s_local.zarr", "s_dask.zarr")):
        da, db = xr.open_zarr(tmp_path / a, consolidated=False), xr.open_zarr(tmp_path / b, consolidated=False)
        assert sorted(da.data_vars) == sorted(db.data_vars)
        for name in da.data_vars:
            np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=f"{a}: {name}")


@pytest.mark.parametrize("device", ["gpu", "cuda:7", "cuda"])
def test_probe_and_sharpness_check_a_device_the_same_way(tmp_path, capsys, device):
    """One device check for every command (probe refused cuda:1 and sharpness accepted any cuda*)."""
    import torch

    from gradlab.cli import main
    from tests.probe.probe_cases import make_run

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the refusals below are CPU-machine refusals")
    ck = make_run(tmp_path)["late"]
    lines = []
    for argv in (["probe", "--checkpoint", str(ck), "--data", "digits", "--out", str(tmp_path / "p.zarr")],
                 ["sharpness", "--checkpoint", str(ck), "--out", str(tmp_path / "s.zarr")]):
        assert main([*argv, "--device", device]) == 2
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert lines[0] == lines[1] and "--device" in lines[0]
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "s.zarr").exists()


_WORKER_FACTS = r"""
import json, os, sys
from gradlab.runner.dispatch import dask_client

def facts():
    # the environment the process was created with (what glibc and the preloaded BLAS read), not os.environ
    with open("/proc/self/environ", "rb") as f:
        start = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    get = lambda k: None if k not in start else start[k].decode()
    return {"torch": "torch" in sys.modules, "gradlab": "gradlab.probe.job" in sys.modules,
            "malloc": get(b"MALLOC_TRIM_THRESHOLD_"), "blas": get(b"OPENBLAS_NUM_THREADS"), "omp": get(b"OMP_NUM_THREADS")}

if __name__ == "__main__":
    client, cluster = dask_client(2, None)
    try:
        got = list(client.run(facts).values())
    finally:
        client.close()
        cluster.close()
    print(json.dumps({"workers": got, "driver_omp": os.environ.get("OMP_NUM_THREADS")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/environ")
def test_local_workers_fork_with_torch_loaded_one_blas_thread_and_glibc_defaults(tmp_path):
    """A fresh process's local cluster: its workers come from a fork server that imported torch and gradlab
    (no import per worker), with Dask's one-thread BLAS/OpenMP variables and without MALLOC_TRIM_THRESHOLD_
    (which made torch 2x slower on workers)."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "facts.py"
    script.write_text(_WORKER_FACTS)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["workers"]) == 2
    for w in res["workers"]:
        assert w == {"torch": True, "gradlab": True, "malloc": None, "blas": "1", "omp": "1"}, w
