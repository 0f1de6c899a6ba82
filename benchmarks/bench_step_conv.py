"""Step protocol on conv nets: the blog's loop vs gradlab's ``loop`` engine (the CPU default for models that are
not Linear/ReLU chains) vs the ``generic`` engine (``vmap`` over trials, the default on other devices).

gradlab's ``cnn`` and ``resnet`` (depth 8) on CIFAR-shaped synthetic data (512 images 3×32×32, random labels),
N = 128 examples per trial, every parameter recorded, lr 0.01, mean reduction.  For each batch size it checks the
engines against the blog's loop in float64 on one trial (max relative difference of ‖S‖, displacement and the
step-norm summaries, must be ≤ 1e-5), then times ``--trials`` trials in float32 and prints s/trial and the ratios.

    python benchmarks/bench_step_conv.py                 # about 1 minute on 2 cores
    python benchmarks/bench_step_conv.py --device cuda   # where torch sees a GPU (default there)
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from gradlab.models import build_model
from gradlab.probe.naive import naive_step_trials
from gradlab.probe.step import step_trials

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_step import max_rel_diff  # noqa: E402

MODELS = {"cnn": {}, "resnet": {"depth": 8}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    idx = torch.as_tensor(np.stack([np.random.default_rng(t).permutation(512)[:128] for t in range(args.trials)]))
    worst = 0.0
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    for name, kwargs in MODELS.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = build_model(name, (3, 32, 32), 10, **kwargs)
        sel = [n for n, _ in net.named_parameters()]
        step_trials(net, x, y, idx[:1], 16, 0.01, "mean", sel, device=dev)  # warm-up
        print(f"{name} ({sum(p.numel() for p in net.parameters()):,} parameters), N = 128, float32, "
              f"{torch.get_num_threads()} threads, device {dev}")
        print(f"{'m':>4} {'blog loop s/trial':>18} {'loop engine':>12} {'ratio':>6} {'generic engine':>15} {'ratio':>6} "
              f"{'f64 max rel diff':>17}")
        for m in (int(v) for v in args.batch_sizes.split(",")):
            ref = naive_step_trials(net, x, y, idx[:1], m, 0.01, "mean", sel, dtype=torch.float64, device=dev)
            diff = max(max_rel_diff(step_trials(net, x, y, idx[:1], m, 0.01, "mean", sel, dtype=torch.float64,
                                                engine=e, device=dev), ref) for e in ("loop", "generic"))
            worst = max(worst, diff)
            t0 = time.perf_counter()
            naive_step_trials(net, x, y, idx, m, 0.01, "mean", sel, count_nonfinite=False, device=dev)
            sync()
            t1 = time.perf_counter()
            step_trials(net, x, y, idx, m, 0.01, "mean", sel, engine="loop", device=dev)
            sync()
            t2 = time.perf_counter()
            step_trials(net, x, y, idx, m, 0.01, "mean", sel, engine="generic", device=dev)
            sync()
            t3 = time.perf_counter()
            n, lo, ge = (t1 - t0) / args.trials, (t2 - t1) / args.trials, (t3 - t2) / args.trials
            print(f"{m:>4} {n:>18.3f} {lo:>12.3f} {n / lo:>5.2f}x {ge:>15.3f} {n / ge:>5.2f}x {diff:>17.1e}", flush=True)
    ok = worst <= 1e-5
    print(f"float64 agreement: worst relative difference {worst:.1e} ({'ok' if ok else 'FAILED'}: <= 1e-5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
