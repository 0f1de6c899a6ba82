"""cbs speed: a whole grid of branches in lock-step (the chain engine, batched matmuls) vs every branch as its own
training run (the loop engine: torch.optim on a private copy), on a digits MLP, same seeds, float64.

For one checkpoint (the MLP at a random init, trained nothing: speed does not depend on the weights) it runs the grid
``--batch-sizes`` × ``--lr-factors`` × ``--seeds`` for ``--budget`` examples with ``--evals`` evaluations, with
each engine in a fresh subprocess (so that peak RSS is per engine), ``--repeats`` times alternating the engines,
keeping the fastest, and prints the time of each, the ratio, the largest absolute loss difference between the two
(float64: must be ≤ 1e-10) and each engine's peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/bench_cbs.py                         # MLP 64-64-10 (widths [64])
    OMP_NUM_THREADS=1 python benchmarks/bench_cbs.py --widths 1024,1024      # the blog's MLP
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _child(args: argparse.Namespace) -> None:
    import torch

    from gradlab.cbs import engine
    from gradlab.cbs.job import eval_subset, example_stream
    from gradlab.datasets import load_data
    from gradlab.models import build_model
    from gradlab.task import cross_entropy, index_batch, to_run

    torch.set_num_threads(1)
    data = load_data("digits")
    widths = [int(w) for w in args.widths.split(",")]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("mlp", data.input_shape, 10, widths=widths).double()
    train = to_run(data.train.batch, dtype=torch.float64)
    test = to_run(data.test.batch, dtype=torch.float64)
    ev = index_batch(train, torch.as_tensor(eval_subset(0, len(data.train), args.eval_examples)))
    factors = [float(f) for f in args.lr_factors.split(",")]
    streams = np.stack([example_stream(0, s, args.budget, len(data.train)) for s in range(args.seeds)])
    recipe = engine.Recipe("sgd", args.momentum, 0.0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = {}
    for m in (int(b) for b in args.batch_sizes.split(",")):
        e = np.round(np.arange(args.evals + 1) * args.budget / args.evals).astype(np.int64)
        steps = -(-e // m)
        lrs = np.repeat([0.05 * f for f in factors], args.seeds)
        stream = np.tile(streams, (len(factors), 1))
        if args.engine == "chain":
            r = engine.chain_branches(model, *train, ev, test, stream, lrs, m, steps, recipe, dtype=torch.float64)
        else:
            r = engine.loop_branches(model, cross_entropy, train, ev, test, stream, lrs, m, steps, recipe,
                                     dtype=torch.float64)
        out[m] = np.stack([r.train_loss, r.test_loss]).tolist()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "setup_mib": rss0 / 1024, "losses": out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="64")
    p.add_argument("--batch-sizes", default="8,16,32,64,128,256")
    p.add_argument("--lr-factors", default="0.5,1")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--evals", type=int, default=16)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        _child(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for eng in ("chain", "loop"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--engine", eng]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
            if eng not in best or res["seconds"] < best[eng]["seconds"]:
                best[eng] = res
    diff = max(float(np.abs(np.asarray(best["chain"]["losses"][m]) - np.asarray(best["loop"]["losses"][m])).max())
               for m in best["chain"]["losses"])
    n = len(args.batch_sizes.split(",")) * len(args.lr_factors.split(",")) * args.seeds
    print(f"digits MLP widths [{args.widths}], {n} branches (batch sizes {args.batch_sizes} × lr factors "
          f"{args.lr_factors} × {args.seeds} seeds), budget {args.budget}, {args.evals} evals, SGD momentum {args.momentum:g}, "
          "float64, 1 thread")
    print(f"  lock-step (chain): {best['chain']['seconds']:.2f} s, peak RSS {best['chain']['peak_mib']:.0f} MiB "
          f"(after set-up {best['chain']['setup_mib']:.0f})")
    print(f"  branch by branch (loop): {best['loop']['seconds']:.2f} s, peak RSS {best['loop']['peak_mib']:.0f} "
          f"MiB (after set-up {best['loop']['setup_mib']:.0f})")
    print(f"  ratio: {best['loop']['seconds'] / best['chain']['seconds']:.2f}x; max |loss difference| {diff:.2e}")
    assert diff <= 1e-10, diff


if __name__ == "__main__":
    main()
