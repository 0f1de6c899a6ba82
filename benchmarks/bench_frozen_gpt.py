"""Frozen protocol on a small causal transformer: gradlab's Gram engine vs recomputing every minibatch's backward pass,
vs torch.func vmap(grad) per-example gradients followed by the Gram product, vs Opacus per-example gradients.

Model: the zoo's ``gpt`` (nanoGPT-style: token + position embeddings, pre-LayerNorm blocks with causal
self-attention through Linear q/k/v/proj and a GELU MLP, final LayerNorm, linear head; 4 layers, n_embd 128,
4 heads, block 64, vocabulary 65, untied head by default, ``--tied`` ties it to the token embedding), at its
initialisation (seed 0), in eval mode.  Data:
N = 256 random token sequences of 64 tokens, labels the next token (a fixed generator); loss ``lm`` (ℓᵢ = mean token
cross-entropy of sequence i), mean reduction, every parameter selected, all batch sizes m | 256 (1, 2, 4, …, 256).
Each method gives every minibatch gradient norm ‖(1/m) Σ_{i∈B} gᵢ‖ (511 minibatches):

- ``engine``: ``GramEngine(model, all, loss=lm, grad_sum=False)`` then ``frozen_trial`` (block sums of K);
  ``engine+S`` also forms Σᵢ gᵢ per tensor, as ``gradlab probe`` does;
- ``recompute``: one forward/backward pass per minibatch of every partition (511 passes);
- ``vmap``: ``torch.func.vmap(grad(ℓ))`` in chunks of 64 examples into Γ (N × p per tensor), K = Γ Γᵀ per tensor;
- ``opacus``: Opacus ``GradSampleModule`` (hooks, per-example gradients in ``p.grad_sample``), then K = Γ Γᵀ, for
  every tensor but the position embedding (its ids (T,) have no batch dimension, which Opacus' hooks cannot split;
  so its norms are not compared); install it for the benchmark only (``pip install --no-deps --target DIR
  opacus`` and DIR on PYTHONPATH).  BackPACK is not run: its per-example gradients (``BatchGrad``, version 1.7.1)
  cover Linear, convolutions, batch norm, Embedding and RNNs but not LayerNorm, which every block here has.

Each method runs in a fresh subprocess: its time (the engine's second call, after the first call planned the layers;
the others after one warm-up: a full round, or one minibatch per batch size for recompute) and its peak memory (the child's VmHWM, minus the VmRSS it had before the first call).
By default the engine's children rerun in float64 (every method's with ``--check-all``) and the parent compares
every minibatch norm with float64 per-example autograd (one ``torch.autograd.grad`` per example): max relative
difference ≤ 1e-12 required.
Targets (issue 12): engine ≥ 5x faster than recompute and ≥ 1.5x faster than vmap(grad).

    python benchmarks/bench_frozen_gpt.py                   # all methods, float32 timings, float64 check
    python benchmarks/bench_frozen_gpt.py --methods engine,vmap --no-check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.models import build_model
from gradlab.probe.frozen import frozen_trial
from gradlab.probe.gram import GramEngine
from gradlab.task import index_batch, lm

N, VOCAB, BLOCK, N_LAYER, N_EMBD, N_HEAD = 256, 65, 64, 4, 128, 4
SIZES = tuple(2**k for k in range(9))  # every m that divides 256
METHODS = ("engine", "recompute", "vmap", "opacus")  # also "engine+S" (forms Σᵢ gᵢ too)


def setup(tied: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("gpt", (BLOCK,), VOCAB, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
                            tie_weights=tied).eval()
    seq = torch.randint(0, VOCAB, (N, BLOCK + 1), generator=torch.Generator().manual_seed(1))
    return model, (seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


def norms_from_grams(grams: dict[str, torch.Tensor]) -> np.ndarray:
    kinds = {n: "bias" if n.endswith("bias") else "weight" for n in grams}
    return frozen_trial(grams, kinds, SIZES, "mean").minibatch_grad_norm


# -- methods: each returns the (len(SIZES), N) minibatch norms (NaN-padded) ---------------------------------------
def run_engine(model: nn.Module, batch, dtype: torch.dtype, with_sum: bool = False):
    names = [n for n, _ in model.named_parameters()]
    engine = GramEngine(model, names, loss=lm, dtype=dtype, grad_sum=with_sum)
    return lambda: norms_from_grams(engine(batch).gram), engine


def run_recompute(model: nn.Module, batch, dtype: torch.dtype):
    net = model.to(dtype)
    params = list(net.parameters())

    def go(warm_up: bool = False) -> np.ndarray:
        out = np.full((len(SIZES), N), np.nan)
        for i, m in enumerate(SIZES):
            for k in range(1 if warm_up else N // m):
                grads = torch.autograd.grad(lm(net, index_batch(batch, slice(k * m, (k + 1) * m))).mean(), params)
                out[i, k] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return out

    return go, None


def run_vmap(model: nn.Module, batch, dtype: torch.dtype, chunk: int = 64):
    from torch.func import functional_call, grad, vmap

    net = model.to(dtype)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, p, (ids[None],))
        return F.cross_entropy(logits[0], labels)  # ℓᵢ: mean token cross-entropy (no label is -100 here)

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def go() -> np.ndarray:
        gamma = {n: torch.empty(N, p.numel(), dtype=dtype) for n, p in params.items()}
        for s in range(0, N, chunk):
            g = per_example(params, batch[0][s:s + chunk], batch[1][s:s + chunk])
            for n in params:
                gamma[n][s:s + chunk] = g[n].reshape(g[n].shape[0], -1)
        return norms_from_grams({n: (v @ v.T).double() for n, v in gamma.items()})

    return go, None


def run_opacus(model: nn.Module, batch, dtype: torch.dtype):
    from opacus import GradSampleModule

    model = model.to(dtype).train()  # Opacus records activations in training mode only (the zoo gpt has no dropout)
    model.wpe.weight.requires_grad_(False)  # position ids (T,) carry no batch dimension: Opacus cannot split them
    net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    def go() -> np.ndarray:
        net.zero_grad(set_to_none=True)
        for p in net.parameters():
            p.grad_sample = None
        lm(net, batch).sum().backward()
        grams = {n: (lambda g: (g @ g.T).double())(p.grad_sample.reshape(N, -1)) for n, p in params}
        return norms_from_grams(grams)

    return go, None


def child(method: str, dtype_name: str, check: bool, check_all: bool, tied: bool, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    result: dict = {"method": method}
    rss0 = _status("VmRSS")
    model, batch = setup(tied)
    maker = {"engine": run_engine, "engine+S": lambda m, b, d: run_engine(m, b, d, True), "recompute": run_recompute,
             "vmap": run_vmap, "opacus": run_opacus}[method]
    dtype = getattr(torch, dtype_name)
    go, engine = maker(model, batch, dtype)
    start = time.perf_counter()
    go(warm_up=True) if method == "recompute" else go()  # warm-up (the engine plans its layers here)
    result["first_s"] = time.perf_counter() - start
    start = time.perf_counter()
    go()
    result["seconds"] = time.perf_counter() - start
    result["peak_mib"] = (_status("VmHWM") - rss0) / 1024
    if engine is not None:
        result["fallback"] = list(engine._fallback)
        result["modes"] = sorted({f"{type(h).__name__}:{h.mode}" for h in engine._layers.values()})
    if check and (method.startswith("engine") or check_all):
        model, batch = setup(tied)
        go64, _ = maker(model, batch, torch.float64)
        result["norms64"] = go64().tolist()
    with open(out_path, "w") as f:
        json.dump(result, f)


def _status(key: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: this process's peak resident set size, not inherited)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reference(tied: bool) -> np.ndarray:
    """Minibatch norms from float64 per-example autograd: one torch.autograd.grad of ℓᵢ per example."""
    model, batch = setup(tied)
    net = model.double()
    params = list(net.parameters())
    gamma = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        lm(net, index_batch(batch, slice(i, i + 1))).sum(), params)]) for i in range(N)])
    out = np.full((len(SIZES), N), np.nan)
    for i, m in enumerate(SIZES):
        for k in range(N // m):
            out[i, k] = float(gamma[k * m:(k + 1) * m].mean(0).norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 agreement check")
    parser.add_argument("--check-all", action="store_true",
                        help="float64 agreement for every method (default: the engine's only)")
    parser.add_argument("--tied", action="store_true", help="tie the head to the token embedding (as nanoGPT)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype, not args.no_check, args.check_all, args.tied, args.out)
        return
    model, _ = setup(args.tied)
    print(f"GPT {N_LAYER} layers, n_embd {N_EMBD}, block {BLOCK}, vocab {VOCAB}, {'tied' if args.tied else 'untied'} "
          f"head ({sum(p.numel() for p in model.parameters()):,} parameters), N = {N}, batch sizes {SIZES}, "
          f"{torch.get_num_threads()} torch threads, {args.dtype} timings")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = os.path.join(tmp, method + ".json")
            cmd = [sys.executable, __file__, "--child", method, "--dtype", args.dtype, "--out", out]
            cmd += ["--no-check"] * args.no_check + ["--check-all"] * args.check_all + ["--tied"] * args.tied
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{method:>10}: not measured ({last})")
                continue
            with open(out) as f:
                results[method] = r = json.load(f)
            extra = f", fallback {r['fallback']}, {', '.join(r['modes'])}" if "modes" in r else ""
            print(f"{method:>10}: {r['seconds']:.3f} s (first call {r['first_s']:.3f} s), peak memory "
                  f"{r['peak_mib']:.0f} MiB{extra}")
    if "engine" in results:
        t = results["engine"]["seconds"]
        for method, target in (("recompute", 5.0), ("vmap", 1.5), ("opacus", None)):
            if method in results:
                ratio = results[method]["seconds"] / t
                verdict = f" (target >= {target}x): {'PASS' if ratio >= target else 'FAIL'}" if target else ""
                print(f"engine vs {method}: {ratio:.2f}x faster{verdict}")
    if not args.no_check and results:
        ref = reference(args.tied)
        ok = True
        for method, r in results.items():
            if "norms64" not in r or method == "opacus":
                continue
            got = np.array(r["norms64"], dtype=float)
            rel = float(np.nanmax(np.abs(got - ref) / np.abs(ref)))
            ok &= rel <= 1e-12 and bool(np.array_equal(np.isnan(got), np.isnan(ref)))
            print(f"float64 agreement, {method}: all {int(np.isfinite(ref).sum())} minibatch norms, max relative "
                  f"difference {rel:.1e} vs per-example autograd -> {'PASS' if rel <= 1e-12 else 'FAIL'} (1e-12)")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
