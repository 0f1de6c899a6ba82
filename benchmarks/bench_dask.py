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
the N-worker store (thread counts differ, so rounding may).  The four runs are repeated ``--repeats`` rounds,
interleaved (this machine's speed drifts with its neighbours' load); each round's ratios and their medians are
printed; then ``--workers N`` and one worker on one thread once more, each as a fresh ``python -m gradlab``
process (what a shell user pays: the interpreter, the imports and the fork server's start).

    python benchmarks/bench_dask.py                 # 128 trials, 3 rounds
    python benchmarks/bench_dask.py --trials 16 --repeats 1    # a quick look

Local workers are forked from a fork server that imported torch and gradlab once
(:func:`gradlab.runner.dispatch._start_method`): the first distributed run of a process starts it (as a CLI call
always does); later runs in the same process reuse it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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


def _timed_process(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=128)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-cold", action="store_true", help="skip the two runs in fresh processes")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the four runs, interleaved (default 3)")
    args = ap.parse_args()
    import xarray as xr

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _timed(["train", "--batch-sizes", "64", "--epochs", "1", "--checkpoint-epochs", "1", "--out", str(d / "t"),
                "--no-progress"])
        ck = next((d / "t" / "runs").glob("*/epoch001.pt"))
        probe = ["probe", "--checkpoint", str(ck), "--data", "digits", "--protocol", "frozen", "--trials",
                 str(args.trials), "--no-progress"]
        import torch

        rounds = []
        for r in range(args.repeats):  # the conditions interleaved round by round (the host's noise drifts)
            t_local = _timed([*probe, "--out", str(d / f"local{r}.zarr")])
            t_one = _timed([*probe, "--out", str(d / f"w1{r}.zarr"), "--workers", "1"])
            t_n = _timed([*probe, "--out", str(d / f"wn{r}.zarr"), "--workers", str(args.workers)])
            old = torch.get_num_threads()
            torch.set_num_threads(1)  # a store made now records 1 thread per unit: one worker on one core
            try:
                t_one_1 = _timed([*probe, "--out", str(d / f"w1t1{r}.zarr"), "--workers", "1"])
            finally:
                torch.set_num_threads(old)
            rounds.append((t_local, t_one, t_n, t_one_1))
        cold = None
        if not args.no_cold:  # each a fresh `gradlab` process, as from a shell: fork server started afresh
            cli = [sys.executable, "-m", "gradlab", *probe]
            env1 = {**os.environ, "OMP_NUM_THREADS": "1"}  # the store records 1 thread per unit
            cold = (_timed_process([*cli, "--out", str(d / "cold_wn.zarr"), "--workers", str(args.workers)]),
                    _timed_process([*cli, "--out", str(d / "cold_w1t1.zarr"), "--workers", "1"], env1))
        a = xr.open_zarr(d / "local0.zarr", consolidated=False).minibatch_grad_norm.values
        b = xr.open_zarr(d / "wn0.zarr", consolidated=False).minibatch_grad_norm.values
        ok = np.isfinite(a)
        rel = float(np.max(np.abs(a[ok] - b[ok]) / np.abs(a[ok]))) if ok.any() else float("nan")
    w = args.workers
    print(f"frozen probe, digits MLP 64-1024-1024-10, {args.trials} trials, N = 1024, 11 batch sizes, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"  round | local | --workers 1 | --workers {w} | --workers 1, 1 thread | {w} / local (<= 1.1) | "
          f"1 / {w} | 1 on 1 thread / {w} (>= 1.6)")
    for r, (t_local, t_one, t_n, t_one_1) in enumerate(rounds):
        note = "  (starts the fork server)" if r == 0 else ""
        print(f"  {r:5d} | {t_local:5.1f} | {t_one:11.1f} | {t_n:12.1f} | {t_one_1:21.1f} | {t_n / t_local:18.2f}x | "
              f"{t_one / t_n:5.2f}x | {t_one_1 / t_n:24.2f}x{note}")
    med = [statistics.median(x) for x in zip(*[(n / lo, o / n, o1 / n) for lo, o, n, o1 in rounds])]
    print(f"  median over rounds: workers {w} / local {med[0]:.2f}x (target <= 1.1); workers 1 / workers {w} "
          f"{med[1]:.2f}x (one worker already gets every core's threads); workers 1 (1 thread) / workers {w} "
          f"(1 thread each) {med[2]:.2f}x (target >= 1.6)")
    if cold is not None:
        print(f"  fresh processes (python -m gradlab ..., interpreter, imports and fork server included): "
              f"--workers {w} {cold[0]:.1f} s, --workers 1 on 1 thread {cold[1]:.1f} s: {cold[1] / cold[0]:.2f}x")
    print(f"  local vs {w} workers: max relative difference of minibatch norms {rel:.1e}")

if __name__ == "__main__":
    main()
