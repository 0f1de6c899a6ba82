"""Coverage of the frozen-store intervals in the real regime (issue 15, "Outcomes"): a trained digits MLP's
per-example gradients over the whole pool (n = 1438) are the population; each replicate draws T trials of
N = 1024 examples without replacement (N/n = 71%, heavy-tailed ‖gᵢ‖², one minibatch at m = N) and computes the
95% intervals of ‖G‖², tr Σ, B_noise -- the U-statistic headline (``analysis.moments``) and the noise-law WLS fit
(``analysis.noise_model``) -- against the pool's exact values.

Run: ``python benchmarks/calibrate_real_regime.py [--replicates 100] [--trials 40] [--widths 32] [--epochs 30]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def pool_gradients(widths: list[int], epochs: int, seed: int) -> np.ndarray:
    from torch.func import functional_call, grad, vmap

    from gradlab.datasets import load_data
    from gradlab.models import build_model

    data = load_data("digits")
    torch.manual_seed(seed)
    net = build_model("mlp", data.input_shape, 10, widths=widths)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = data.train.x, data.train.y
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net = net.double().eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    return torch.cat([v.reshape(len(y), -1) for v in gs.values()], 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicates", type=int, default=100)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--widths", default="32")
    ap.add_argument("--n-boot", type=int, default=499)
    ap.add_argument("--epochs", type=int, default=30, help="training epochs (30: heavy-tailed ‖gᵢ‖²)")
    args = ap.parse_args()
    from gradlab.analysis.moments import moment_estimates
    from gradlab.analysis.noise_model import fit_noise_model

    t0 = time.time()
    pool = pool_gradients([int(w) for w in args.widths.split(",")], args.epochs, 0)
    n, budget = pool.shape[0], 1024
    gbar = pool.mean(0)
    truth = {"grad_sq_norm": float(gbar @ gbar), "trace_cov": float(np.mean(np.sum((pool - gbar) ** 2, 1)))}
    truth["b_noise"] = truth["trace_cov"] / truth["grad_sq_norm"]
    sq = np.sum(pool**2, 1)
    print(f"pool n = {n}, N = {budget} (N/n = {budget / n:.0%}), d = {pool.shape[1]}; truth {truth}; "
          f"‖gᵢ‖² max/median = {sq.max() / np.median(sq):.1f} ({time.time() - t0:.0f} s)")
    m = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    hits = {k: np.zeros(3) for k in ("u_statistics", "wls_fit")}
    for r in range(args.replicates):
        rng = np.random.default_rng(np.random.SeedSequence([15, r]))
        idx = np.stack([rng.permutation(n)[:budget] for _ in range(args.trials)])
        g = pool[idx]  # (T, N, d)
        t1 = np.sum(g**2, (1, 2))
        t2 = np.sum(g.sum(1) ** 2, 1)
        q = np.stack([np.mean(np.sum(g.reshape(args.trials, budget // mm, mm, -1).sum(2) ** 2, -1), -1) / mm**2
                      for mm in m])
        u = moment_estimates(t1, t2, budget, n, False, n_boot=args.n_boot, rng=rng)
        w = fit_noise_model(q, m, pool_size=n, replacement=False, n_boot=args.n_boot, rng=rng, lack_of_fit=False)
        for name, est in (("u_statistics", u), ("wls_fit", {"grad_sq_norm": w.grad_sq_norm,
                                                           "trace_cov": w.trace_cov, "b_noise": w.b_noise})):
            hits[name] += [est[k].contains(truth[k]) for k in ("grad_sq_norm", "trace_cov", "b_noise")]
    for name, h in hits.items():
        cov = h / args.replicates
        print(f"{name}: coverage of the 95% intervals over {args.replicates} replicates of {args.trials} trials: "
              f"‖G‖² {cov[0]:.2f}, tr Σ {cov[1]:.2f}, B_noise {cov[2]:.2f}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
