"""Frozen protocol: naive per-minibatch recomputation vs gradlab's Gram engine, same trials, one run.

The blog's MLP (784-1024-1024-10), N = 1024 examples per trial of synthetic MNIST-shaped data, all 15 batch sizes
(1..8, 16, ..., 1024), every parameter selected, mean reduction.  m = 3, 5, 6, 7 do not divide 1024: both methods
use the ⌊N/m⌋ full minibatches (as a DataLoader with drop_last=True; ``gradlab probe`` itself requires divisors).
The naive method runs one forward/backward pass per minibatch of every partition (2,908 passes per trial) and
takes each minibatch gradient's norm and the sum S; the engine builds per-example Gram matrices once (linear-layer
identity) and reads every minibatch norm off diagonal block sums (``gradlab.probe.gram`` + ``gradlab.probe.frozen``).
Timings use ``--dtype`` (float32 by default); the agreement check reruns both in float64 (with ``--dtype float64``
it reuses the timed first trial) and requires every minibatch norm and ‖S‖ to agree to rtol 1e-5.  Target
(issue 3): engine ≥ 50x faster.

    python benchmarks/bench_frozen.py                 # 1 timed trial (float32) + float64 check
    python benchmarks/bench_frozen.py --dtype float64 # 1 timed float64 trial, also the check (one naive run)
    python benchmarks/bench_frozen.py --trials 3 --no-check
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from gradlab.models import build_model
from gradlab.probe.frozen import frozen_trial
from gradlab.probe.gram import GramEngine
from gradlab.probe.sampling import draw_trial

BATCH_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024)
BUDGET = 1024
POOL = 4096


def synthetic_pool(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-shaped data: 4,096 images (1, 28, 28) in [0, 1] and labels 0..9 from an explicit generator."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((POOL, 1, 28, 28), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, POOL))
    return x, y


def naive(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
    """Minibatch gradient norms (M, N, NaN-padded) and ‖S‖ (M,) by one backward pass per minibatch."""
    net = copy.deepcopy(model).to(dtype)
    params = list(net.parameters())
    x = x.to(dtype)
    mb = np.full((len(BATCH_SIZES), BUDGET), np.nan)
    s_norm = np.empty(len(BATCH_SIZES))
    for i, m in enumerate(BATCH_SIZES):
        s = [torch.zeros_like(p) for p in params]
        for k in range(BUDGET // m):
            grads = torch.autograd.grad(F.cross_entropy(net(x[k * m:(k + 1) * m]), y[k * m:(k + 1) * m]), params)
            mb[i, k] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            for acc, g in zip(s, grads):
                acc += g
        s_norm[i] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in s])))
    return mb, s_norm


def engine_trial(engine: GramEngine, kinds: dict[str, str], x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[np.ndarray, np.ndarray]:
    res = engine(x, y)
    ft = frozen_trial(res.gram, kinds, BATCH_SIZES, "mean", drop_last=True)
    return ft.minibatch_grad_norm, ft.grad_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 agreement check")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 28, 28), 10, widths=[1024, 1024])
    x_pool, y_pool = synthetic_pool()
    names = [n for n, _ in model.named_parameters()]
    kinds = {n: n.rsplit(".", 1)[1] for n in names}
    print(f"MLP 784-1024-1024-10 ({sum(p.numel() for p in model.parameters()):,} parameters), N = {BUDGET}, "
          f"{len(BATCH_SIZES)} batch sizes, {torch.get_num_threads()} torch threads, {args.dtype}")

    engine = GramEngine(model, names, dtype=dtype, grad_sum=False)  # norms only: no D^T A products
    with_sum = GramEngine(model, names, dtype=dtype)  # as `gradlab probe` runs it (S kept for histograms)
    for e in (engine, with_sum):
        engine_trial(e, kinds, x_pool[:BUDGET], y_pool[:BUDGET])  # warm-up (classification, allocations)
    t_naive, t_engine, t_with_sum = [], [], []
    for t in range(args.trials):
        idx = torch.as_tensor(draw_trial(0, 0, t, BUDGET, POOL))
        x, y = x_pool[idx], y_pool[idx]
        start = time.perf_counter()
        engine_trial(engine, kinds, x, y)
        t_engine.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine_trial(with_sum, kinds, x, y)
        t_with_sum.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = naive(model, x, y, dtype)
        t_naive.append(time.perf_counter() - start)
        if t == 0:
            first = result
        print(f"trial {t}: naive {t_naive[-1]:.2f} s, gram engine {t_engine[-1]:.3f} s, "
              f"ratio {t_naive[-1] / t_engine[-1]:.0f}x")
    ratio = np.mean(t_naive) / np.mean(t_engine)
    print(f"mean per trial: naive {np.mean(t_naive):.2f} s, gram engine {np.mean(t_engine):.3f} s -> "
          f"{ratio:.0f}x faster (target >= 50x): {'PASS' if ratio >= 50 else 'FAIL'}")
    print(f"gram engine also forming S = sum of per-example gradients (as gradlab probe does for histograms): "
          f"{np.mean(t_with_sum):.3f} s -> {np.mean(t_naive) / np.mean(t_with_sum):.0f}x")

    if not args.no_check:
        idx = torch.as_tensor(draw_trial(0, 0, 0, BUDGET, POOL))
        x, y = x_pool[idx], y_pool[idx]
        mb_ref, s_ref = first if args.dtype == "float64" else naive(model, x, y, torch.float64)
        mb, s = engine_trial(GramEngine(model, names, dtype=torch.float64), kinds, x, y)
        ok = np.allclose(mb, mb_ref, rtol=1e-5, atol=0, equal_nan=True) and np.allclose(s, s_ref, rtol=1e-5, atol=0)
        rel = np.nanmax(np.abs(mb - mb_ref) / np.abs(mb_ref))
        print(f"float64 agreement (all {int(np.isfinite(mb_ref).sum())} minibatch norms and 15 ||S||): max relative "
              f"difference {rel:.1e} -> {'PASS' if ok else 'FAIL'} (rtol 1e-5)")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
