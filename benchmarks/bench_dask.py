"""Distributed execution on one machine: a frozen probe run locally vs on a local Dask cluster, same store.

The digits MLP (64-1024-1024-10, gradlab's default widths) at a checkpoint after one epoch on the embedded digits,
frozen protocol, all batch sizes 1..1024, N = 1024, float32, ``--trials`` trials (default 128, the figure of issue
11).  Three runs in one process, each into a new store: local (the driver's torch threads), ``--workers 1`` and
``--workers N`` (N = the cores).  Each Dask worker builds the model and loads the data once for all its units
(:mod:`gradlab.runner.dispatch`), and a store made with ``--workers N`` records ``cores // N`` torch threads per unit,
so N workers do not start N × cores threads; a fourth run makes one worker with one thread (the driver's thread
count set to 1 when the store is made), so that 1 and N workers are compared at the same threads per worker.
Printed: wall times (cluster start-up included), the ratios ``workers N / local`` (target ≤ 1.1) and ``workers 1
/ workers N`` at one thread per worker (target ≥ 1.6), and the largest relative difference between the local and
the N-worker store (thread counts differ, so rounding may).

    python benchmarks/bench_dask.py                 # 128 trials
    python benchmarks/bench_dask.py --trials 16     # a quick look
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(argv: list[str]) -> float:
    from gradlab.cli import main

    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"gradlab {' '.join(argv)} failed")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=128)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    import xarray as xr

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _timed(["train", "--batch-sizes", "64", "--epochs", "1", "--checkpoint-epochs", "1", "--out", str(d / "t"),
                "--no-progress"])
        ck = next((d / "t" / "runs").glob("*/epoch001.pt"))
        probe = ["probe", "--checkpoint", str(ck), "--data", "digits", "--protocol", "frozen", "--trials",
                 str(args.trials), "--no-progress"]
        t_local = _timed([*probe, "--out", str(d / "local.zarr")])
        t_one = _timed([*probe, "--out", str(d / "w1.zarr"), "--workers", "1"])
        t_n = _timed([*probe, "--out", str(d / "wn.zarr"), "--workers", str(args.workers)])
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(1)  # a store made now records 1 thread per unit: one worker on one core
        try:
            t_one_1 = _timed([*probe, "--out", str(d / "w1t1.zarr"), "--workers", "1"])
        finally:
            torch.set_num_threads(old)
        a = xr.open_zarr(d / "local.zarr", consolidated=False).minibatch_grad_norm.values
        b = xr.open_zarr(d / "wn.zarr", consolidated=False).minibatch_grad_norm.values
        ok = np.isfinite(a)
        rel = float(np.max(np.abs(a[ok] - b[ok]) / np.abs(a[ok]))) if ok.any() else float("nan")
    print(f"frozen probe, digits MLP 64-1024-1024-10, {args.trials} trials, N = 1024, 11 batch sizes, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"  local:                {t_local:7.1f} s")
    print(f"  --workers 1:          {t_one:7.1f} s")
    print(f"  --workers {args.workers}:          {t_n:7.1f} s  (each worker on cores/{args.workers} threads)")
    print(f"  --workers 1, 1 thread: {t_one_1:7.1f} s")
    print(f"  workers {args.workers} / local:     {t_n / t_local:5.2f}x   (target <= 1.1)")
    print(f"  workers 1 / workers {args.workers}: {t_one / t_n:5.2f}x   (one worker already gets every core's threads)")
    print(f"  workers 1 (1 thread) / workers {args.workers} (1 thread each): {t_one_1 / t_n:5.2f}x   (target >= 1.6)")
    print(f"  local vs {args.workers} workers: max relative difference of minibatch norms {rel:.1e}")


if __name__ == "__main__":
    main()
