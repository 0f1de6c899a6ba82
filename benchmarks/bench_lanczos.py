"""Lanczos (scipy eigsh) vs power iteration (vs PyHessian when importable) for λ_max of a digits MLP's Hessian.

All methods use the same Hessian (cross-entropy over a fixed sample of the digits training set, float64). The
reference λ_max comes from eigsh with tol=1e-10.  For every start vector (``--seeds``) we count HVPs and time:

- ``lanczos (eigsh)``: ``eigsh(which="LA", tol=1e-3)`` on gradlab's double-backward HVP operator (ARPACK stops
  when the Ritz residual is ≤ 1e-3·θ, which bounds the distance to *some* eigenvalue; it builds ncv = 20 vectors
  before its first check), plus gradlab's 10-HVP deflated miss check (counted);
- ``lanczos (reorth)``: gradlab's plain Lanczos with full reorthogonalisation, stopped by the same residual rule
  (Ritz residual ≤ 1e-3·θ) checked after every HVP, plus the same miss check (counted): "certified" means the
  residual rule *and* a check that no larger eigenvalue was missed (``gradlab.curvature.lanczos`` module doc);
- ``lanczos (oracle stop)``: the first Lanczos step whose top Ritz value is within 1e-3 of the reference;
- ``power (oracle)``: power iteration's first HVP at which the Rayleigh quotient is within 1e-3 of the
  reference -- the best any stopping rule could do;
- ``power (certified)``: power iteration stopped by the certificate Lanczos (reorth) uses, residual
  ‖Hv − θv‖ ≤ 1e-3·θ: the like-for-like comparison of two methods that must know when they are done;
- ``power (usual stop)``: power iteration stopped when the Rayleigh quotient changes by < 1e-3 (PyHessian's
  rule), with the error it then has;
- ``pyhessian``: PyHessian 0.1's ``hessian.eigenvalues(tol=1e-3)`` (its own HVPs through a cached graph), only
  if ``import pyhessian`` works (``--pyhessian-path DIR`` adds a folder holding it, e.g. one made with
  ``pip install --no-deps --target DIR pyhessian``).  Its start vector comes from torch's global RNG, seeded here.

Run: ``python benchmarks/bench_lanczos.py [--samples 1024] [--seeds 5] [--pyhessian-path DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import numpy as np
import torch

from gradlab.curvature.hvp import SampleObjective
from gradlab.curvature.lanczos import lanczos_full_reorth, lanczos_history, power_iteration, top_eigenvalues
from gradlab.datasets import load_data
from gradlab.models import build_model

REL_TOL = 1e-3


def train_mlp(data, epochs: int, seed: int, widths: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A digits MLP 64-w1-w2-10 at init and after a few epochs of SGD (lr 0.1, batch 32)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_model("mlp", data.input_shape, data.n_classes, widths=widths)
    init = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = data.train.x, data.train.y
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return init, net


def first_within(history: np.ndarray, ref: float) -> int:
    """1-based HVP count after which the estimate stays within REL_TOL of ref (0 if never)."""
    ok = np.abs(history - ref) <= REL_TOL * abs(ref)
    bad = np.flatnonzero(~ok)
    if ok.all():
        return 1
    return int(bad[-1] + 2) if bad[-1] + 1 < len(history) else 0


def bench_pyhessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> list[tuple]:
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class as `hessian`)

    count = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*a, **k):
        count["n"] += 1
        return original(*a, **k)

    ph.hessian_vector_product = counted
    rows = []
    try:
        net = copy.deepcopy(model).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = ph.hessian(net, torch.nn.CrossEntropyLoss(), data=(x.double(), y), cuda=False)
            for s in seeds:
                torch.manual_seed(s)  # PyHessian draws its start vector from the global RNG (benchmark only)
                count["n"] = 0
                t0 = time.perf_counter()
                vals, _ = h.eigenvalues(maxIter=1000, tol=REL_TOL, top_n=1)
                rows.append((vals[0], count["n"], time.perf_counter() - t0))
    finally:
        ph.hessian_vector_product = original
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--pyhessian-path", default=None)
    p.add_argument("--widths", default="256,256", help="hidden widths of the MLP")
    p.add_argument("--max-power", type=int, default=1000, help="cap on power-iteration HVPs")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.pyhessian_path:
        sys.path.insert(0, args.pyhessian_path)
    try:
        import pyhessian  # noqa: F401
        have_pyhessian, why = True, ""
    except ImportError as exc:
        have_pyhessian, why = False, str(exc)

    data = load_data("digits")
    rng = np.random.default_rng(np.random.SeedSequence([0, 1]))
    idx = torch.from_numpy(np.sort(rng.choice(len(data.train), size=min(args.samples, len(data.train)),
                                              replace=False)))
    x, y = data.train.x[idx], data.train.y[idx]
    widths = tuple(int(w) for w in args.widths.split(","))
    init, trained = train_mlp(data, args.epochs, seed=0, widths=widths)
    seeds = list(range(args.seeds))
    print(f"model: digits MLP 64-{'-'.join(map(str, widths))}-10, sample N={len(idx)}, float64, relative tolerance {REL_TOL:g}")
    summary = []
    for name, model in (("init", init), (f"trained ({args.epochs} epochs)", trained)):
        obj = SampleObjective(model, x, y, dtype=torch.float64, chunk_size=len(idx))

        def mv(v: np.ndarray) -> np.ndarray:
            return obj.hvp(torch.from_numpy(v)).numpy()

        t0 = time.perf_counter()
        ref = top_eigenvalues(mv, obj.n_params, 2, tol=1e-10, rng=np.random.default_rng(123))
        t_ref = time.perf_counter() - t0
        lam, lam2 = float(ref.eigenvalues[0]), float(ref.eigenvalues[1])
        per_hvp = t_ref / (ref.n_hvp + ref.n_hvp_residual)
        print(f"\n[{name}] {obj.n_params} parameters; reference lambda_max = {lam:.10g} (eigsh tol 1e-10, "
              f"{ref.n_hvp} HVPs, residual {ref.residuals[0]:.2e}); {per_hvp * 1e3:.1f} ms per HVP")
        # power iteration's Rayleigh quotient error falls as (λ₂/λ₁)^(2t): the spectrum alone fixes its HVP count
        # (when |λ_min| < λ₂); a large gap leaves little for any Krylov method to gain over it
        print(f"lambda_2 / lambda_max = {lam2 / lam:.4f}: power iteration needs about "
              f"{np.log(REL_TOL) / (2 * np.log(lam2 / lam)):.1f} HVPs after its start vector's transient")
        print(f"{'method':<22}{'seed':>5}{'HVPs':>7}{'time s':>9}{'rel err':>11}")
        lz, lr, lo, po, pc, pu, py = [], [], [], [], [], [], []
        for s in seeds:
            t0 = time.perf_counter()
            r = top_eigenvalues(mv, obj.n_params, 1, tol=REL_TOL, rng=np.random.default_rng(s))
            t = time.perf_counter() - t0 - per_hvp * r.n_hvp_residual
            err = abs(r.eigenvalues[0] - lam) / lam
            lz.append((r.n_hvp + r.n_hvp_check, t, err))
            print(f"{'lanczos (eigsh)':<22}{s:>5}{lz[-1][0]:>7}{t:>9.3f}{err:>11.2e}")
            t0 = time.perf_counter()
            r2 = lanczos_full_reorth(mv, obj.n_params, 1, tol=REL_TOL, rng=np.random.default_rng(s))
            t2 = time.perf_counter() - t0
            lr.append((r2.n_hvp + r2.n_hvp_check, t2, abs(r2.eigenvalues[0] - lam) / lam))
            print(f"{'lanczos (reorth)':<22}{s:>5}{lr[-1][0]:>7}{t2:>9.3f}{lr[-1][2]:>11.2e}")
            hist = lanczos_history(mv, obj.n_params, 40, rng=np.random.default_rng(s))
            kl = first_within(hist, lam)
            lo.append((kl if kl else np.inf, t2 * kl / max(lr[-1][0], 1), abs(hist[kl - 1] - lam) / lam if kl else np.nan))
            print(f"{'lanczos (oracle stop)':<22}{s:>5}{(kl or '>40'):>7}{lo[-1][1]:>9.3f}{lo[-1][2]:>11.2e}")
            # One power run per seed (tol=0): the usual stop and the oracle stop are read off the same trajectory.
            t0 = time.perf_counter()
            full = power_iteration(mv, obj.n_params, rng=np.random.default_rng(s), tol=0.0, maxiter=args.max_power)
            per_step = (time.perf_counter() - t0) / max(full.n_hvp, 1)
            h = full.history
            k = first_within(h, lam)
            po.append((k if k else np.inf, per_step * k if k else np.inf, abs(h[k - 1] - lam) / lam if k else np.nan))
            print(f"{'power (oracle stop)':<22}{s:>5}{(k or f'>{args.max_power}'):>7}{po[-1][1]:>9.3f}{po[-1][2]:>11.2e}")
            certified = full.residuals <= REL_TOL * np.abs(h)
            kc = int(np.argmax(certified)) + 1 if certified.any() else 0
            pc.append((kc if kc else np.inf, per_step * kc if kc else np.inf,
                       abs(h[kc - 1] - lam) / lam if kc else np.nan))
            print(f"{'power (certified)':<22}{s:>5}{(kc or f'>{args.max_power}'):>7}{pc[-1][1]:>9.3f}"
                  f"{pc[-1][2]:>11.2e}")
            change = np.abs(np.diff(h)) < REL_TOL * np.abs(h[1:])
            ku = int(np.argmax(change)) + 2 if change.any() else len(h)
            pu.append((ku, per_step * ku, abs(h[ku - 1] - lam) / lam))
            print(f"{'power (usual stop)':<22}{s:>5}{ku:>7}{pu[-1][1]:>9.3f}{pu[-1][2]:>11.2e}")
        if have_pyhessian:
            for s, (val, n, t) in zip(seeds, bench_pyhessian(model, x, y, seeds)):
                py.append((n, t, abs(val - lam) / lam))
                print(f"{'pyhessian 0.1':<22}{s:>5}{n:>7}{t:>9.3f}{py[-1][2]:>11.2e}")
        med = {k: (np.median([r[0] for r in v]), np.median([r[1] for r in v]), np.max([r[2] for r in v]))
               for k, v in (("lanczos_eigsh", lz), ("lanczos_reorth", lr), ("lanczos_oracle", lo),
                            ("power_oracle", po), ("power_certified", pc), ("power_usual", pu),
                            ("pyhessian", py)) if v}
        ratio = med["lanczos_reorth"][0] / med["power_oracle"][0]
        summary.append((name, ratio, max(med["lanczos_eigsh"][2], med["lanczos_reorth"][2])))
        print("medians over seeds (HVPs, seconds, worst rel err):")
        for k, (n, t, e) in med.items():
            print(f"  {k:<16} {n:>7.1f} HVPs {t:>8.3f} s  worst err {e:.2e}")
        print(f"  ratio lanczos(reorth, certified) / power(oracle) HVPs = {ratio:.3f}  (target <= 1/3: "
              f"{'met' if ratio <= 1 / 3 else 'NOT met'}); time ratio "
              f"{med['lanczos_reorth'][1] / med['power_oracle'][1]:.3f}")
        print(f"  ratio lanczos(reorth, certified) / power(certified) HVPs = "
              f"{med['lanczos_reorth'][0] / med['power_certified'][0]:.3f} (the same stopping certificate)")
        print(f"  ratio lanczos(oracle) / power(oracle) HVPs = "
              f"{med['lanczos_oracle'][0] / med['power_oracle'][0]:.3f};  eigsh / power(oracle) = "
              f"{med['lanczos_eigsh'][0] / med['power_oracle'][0]:.3f}")
        if "pyhessian" in med:
            print(f"  ratio lanczos(reorth) / pyhessian HVPs = {med['lanczos_reorth'][0] / med['pyhessian'][0]:.3f} "
                  f"(PyHessian's worst error {med['pyhessian'][2]:.1e} vs tolerance {REL_TOL:g})")
    if not have_pyhessian:
        print(f"\nPyHessian not run: `import pyhessian` failed ({why}). It exists on PyPI as PyHessian 0.1 "
              "(pure Python, requires torch); install it without pulling torch with `pip install --no-deps "
              "--target DIR pyhessian` and pass --pyhessian-path DIR.")
    # the exit status checks correctness (certified Lanczos within its tolerance), not the speed target
    bad = [name for name, _, err in summary if not err <= REL_TOL]
    if bad:
        print(f"FAILED: certified Lanczos missed the tolerance {REL_TOL:g} on {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
