"""Step-protocol speed: the blog's per-trial SGD loop vs the lock-step engine, on the blog MLP (784-1024-1024-10).

Synthetic MNIST-shaped data (uniform pixels, random labels, pool of 4096), N = 1024, SGD lr 0.01, mean reduction,
the last layer selected (as in the blog).  For each batch size m it

1. checks agreement in float64 on ``--check-trials`` trials (max relative difference of ‖S‖, displacement and the
   step-norm summaries; must be <= 1e-5),
2. times the blog's loop (the naive reference without its per-step non-finite counting) and the engine in
   ``--dtype`` (float32 by default: what users run) on ``--trials`` trials, interleaved block by block so that load
   from other processes hits both alike, ``--repeats`` times, keeping the fastest,
3. in float32, compares both timed runs with the float64 values of the same trials (the largest relative difference
   over trials; a ReLU input near zero that flips under float32 rounding moves a whole trajectory, in either method),

and prints a table (m, naive s/trial, engine s/trial, ratio, and the differences).  Finally it runs the engine in
fresh subprocesses on 2 and 16 trials and prints their peak memory, which must not grow with the number of trials.

    python benchmarks/bench_step.py                 # m in {1, 2, 4, 8, 16}, about 1.5 minutes on 2 idle cores
    python benchmarks/bench_step.py --full          # the blog's 15 m: {1..8, 16, 32, ..., 1024} (m ∤ N: ⌊N/m⌋ steps)
    python benchmarks/bench_step.py --device cuda --trials-per-block 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from gradlab.models.mlp import MLP
from gradlab.probe.naive import naive_step_trials
from gradlab.probe.step import StepResult, step_trials

POOL, BUDGET, LR, SEED = 4096, 1024, 0.01, 20240601
SELECTED = ("layers.4.weight", "layers.4.bias")  # the blog's choice: the last layer
ALL = tuple(f"layers.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias"))  # gradlab probe's default --params .


def blog_mlp() -> MLP:
    """The blog's MLP with PyTorch's default init distribution U(±1/√fan_in), drawn from an explicit generator."""
    model = MLP(784, 10)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for mod in model.layers:
            if isinstance(mod, torch.nn.Linear):
                bound = 1.0 / math.sqrt(mod.in_features)
                mod.weight.uniform_(-bound, bound, generator=g)
                mod.bias.uniform_(-bound, bound, generator=g)
    return model


def synthetic_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.rand(POOL, 1, 28, 28, generator=g), torch.randint(0, 10, (POOL,), generator=g)


def draws(trials: int) -> torch.Tensor:
    """Trial t draws N pool indices without replacement from SeedSequence((SEED, t))."""
    rows = [np.random.default_rng(np.random.SeedSequence((SEED, t))).permutation(POOL)[:BUDGET] for t in range(trials)]
    return torch.as_tensor(np.stack(rows))


def norm_s(r: StepResult) -> np.ndarray:
    return np.sqrt(sum(np.square(v.astype(np.float64)).reshape(len(v), -1).sum(1) for v in r.grad_sum.values()))


def rows_of(r: StepResult, start: int, stop: int) -> StepResult:
    """Trials start..stop-1 of r."""
    return StepResult({n: v[start:stop] for n, v in r.grad_sum.items()},
                      *(getattr(r, f)[start:stop] for f in ("displacement", "step_norm_mean", "step_norm_std",
                                                             "step_norm_max", "nonfinite")))


def max_rel_diff(a: StepResult, b: StepResult) -> float:
    pairs = [(norm_s(a), norm_s(b))] + [(getattr(a, f), getattr(b, f)) for f in
                                        ("displacement", "step_norm_mean", "step_norm_std", "step_norm_max")]
    return max(float(np.max(np.abs(u - v) / np.maximum(np.abs(v), 1e-300))) for u, v in pairs)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM).  Not ``getrusage().ru_maxrss``: Linux carries that over from
    the parent through fork and exec, so a child started by a 450 MiB parent reports at least 450 MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(trials: int, device: str, selected: tuple[str, ...]) -> None:
    """Child-process mode: run the engine on ``trials`` trials at m = 64 and print as JSON its peak memory and the
    size of the S arrays it returns (O(trials × selected) by nature: ``gradlab probe`` passes a unit at a time)."""
    model, (x, y) = blog_mlp(), synthetic_data()
    r = step_trials(model, x, y, draws(trials), 64, LR, "mean", selected, device=device)
    out = sum(v.nbytes for v in r.grad_sum.values()) / 2**20
    print(json.dumps({"trials": trials, "peak_rss_mib": peak_rss_mib(), "returned_mib": out}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="m in {1..8, 16, ..., 1024} instead of {1, 2, 4, 8, 16}")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated m values (overrides --full)")
    ap.add_argument("--trials", type=int, default=4, help="timed trials per batch size (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats; the fastest is reported (default 2)")
    ap.add_argument("--check-trials", type=int, default=2, help="float64 agreement trials (default 2; 0 skips)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="timing dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trials-per-block", type=int, default=None, help="engine block size (default: engine's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--select", choices=["last", "all"], default="last",
                    help="recorded parameters: the blog's last layer (default) or all (gradlab probe's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory check")
    ap.add_argument("--_memory-probe", type=int, default=None, dest="memory_probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        memory_probe(args.memory_probe, args.device, SELECTED if args.select == "last" else ALL)
        return 0

    sizes = [1, 2, 3, 4, 5, 6, 7, 8] + [2 ** k for k in range(4, 11)] if args.full else [1, 2, 4, 8, 16]
    if args.batch_sizes:
        sizes = [int(v) for v in args.batch_sizes.split(",")]
    bad = [m for m in sizes if not 1 <= m <= BUDGET]
    if bad:
        ap.error(f"batch sizes must lie in 1..N = {BUDGET}: {bad}")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    selected = SELECTED if args.select == "last" else ALL
    model, (x, y) = blog_mlp(), synthetic_data()
    tpb = args.trials_per_block or (32 if args.device.startswith("cuda") else 2)
    idx_all = draws(max(args.trials, args.check_trials))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"blog MLP 784-1024-1024-10, N={BUDGET}, lr={LR}, mean reduction, selected={list(selected)}, "
          f"device={args.device}, threads={torch.get_num_threads()}, timing dtype={args.dtype}, "
          f"trials={args.trials}, trials_per_block={tpb}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    print(f"{'m':>5} {'naive s/trial':>14} {'engine s/trial':>15} {'ratio':>7} {'f64 max rel diff':>17} "
          f"{'naive f32 vs f64':>15} {'engine f32 vs f64':>16}", flush=True)
    worst = 0.0
    total_naive = total_engine = 0.0
    for m in sizes:
        # an m that does not divide N (the blog's 3, 5, 6, 7) takes its ⌊N/m⌋ full minibatches, as a DataLoader with
        # drop_last=True: each trial's first ⌊N/m⌋·m draws
        idx = idx_all[:, :(BUDGET // m) * m]
        check = float("nan")
        if args.check_trials:
            rows = idx[:args.check_trials]
            ref = naive_step_trials(model, x, y, rows, m, LR, "mean", selected, dtype=torch.float64, device=args.device)
            got = step_trials(model, x, y, rows, m, LR, "mean", selected, dtype=torch.float64, device=args.device,
                              trials_per_block=tpb)
            check = max_rel_diff(got, ref)
            worst = max(worst, check)
        best_naive = best_engine = math.inf
        # float64 values of the timed trials: how far each float32 run lands from them (rounding, not method)
        truth = step_trials(model, x, y, idx[:args.trials], m, LR, "mean", selected, dtype=torch.float64,
                            device=args.device, trials_per_block=tpb) if dtype == torch.float32 else None
        off_naive = off_engine = 0.0
        for _ in range(args.repeats):
            t_naive = t_engine = 0.0
            for start in range(0, args.trials, tpb):
                rows = idx[start:min(start + tpb, args.trials)]
                t0 = time.perf_counter()
                ref = naive_step_trials(model, x, y, rows, m, LR, "mean", selected, dtype=dtype, device=args.device,
                                        count_nonfinite=False)  # the blog's loop as it was: no isfinite passes
                sync()
                t1 = time.perf_counter()
                got = step_trials(model, x, y, rows, m, LR, "mean", selected, dtype=dtype, device=args.device,
                                  trials_per_block=tpb)
                sync()
                t2 = time.perf_counter()
                t_naive, t_engine = t_naive + t1 - t0, t_engine + t2 - t1
                if truth is not None:
                    sub = rows_of(truth, start, start + len(rows))
                    off_naive = max(off_naive, max_rel_diff(ref, sub))
                    off_engine = max(off_engine, max_rel_diff(got, sub))
            best_naive, best_engine = min(best_naive, t_naive), min(best_engine, t_engine)
        n, e = best_naive / args.trials, best_engine / args.trials
        total_naive, total_engine = total_naive + n, total_engine + e
        print(f"{m:>5} {n:>14.3f} {e:>15.3f} {n / e:>6.1f}x {check:>17.1e} {off_naive:>15.1e} {off_engine:>16.1e}",
              flush=True)
    print(f"{'all':>5} {total_naive:>14.3f} {total_engine:>15.3f} {total_naive / total_engine:>6.1f}x   "
          f"(one trial over every batch size above; x 1000 trials x 2 checkpoints: naive "
          f"{total_naive * 2000 / 3600:.1f} h, engine {total_engine * 2000 / 3600:.2f} h)")
    status = 0
    print(f"load average now {os.getloadavg()[0]:.1f} (timings are only comparable when it stays below the core "
          "count: other processes stall every multi-threaded op)")
    if args.check_trials:
        ok = worst <= 1e-5
        print(f"float64 agreement: worst relative difference {worst:.1e} ({'ok' if ok else 'FAILED'}: <= 1e-5)")
        status = 0 if ok else 1
    if not args.no_memory:
        peaks = []
        for trials in (2, 16):
            out = subprocess.run([sys.executable, __file__, "--_memory-probe", str(trials), "--device", args.device,
                                  "--threads", str(args.threads), "--select", args.select], capture_output=True, text=True, check=True)
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        growth = peaks[1]["peak_rss_mib"] - peaks[0]["peak_rss_mib"]
        grown_out = peaks[1]["returned_mib"] - peaks[0]["returned_mib"]
        print("peak RSS of the engine at m=64: " + ", ".join(f"{p['trials']} trials {p['peak_rss_mib']:.0f} MiB"
                                                          for p in peaks) +
              f" (growth {growth:+.0f} MiB, of which the returned S arrays {grown_out:+.0f} MiB)")
    return status


if __name__ == "__main__":
    sys.exit(main())
