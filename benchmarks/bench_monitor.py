"""Training-step time with the noise monitor vs without, vs a naive per-example autograd loop; peak memory.

Models: the blog's MLP (784-1024-1024-10, batch 64, SGD lr 0.01, synthetic MNIST-shaped data); the zoo's ``gpt``
(issue 12's size: 4 blocks, n_embd 128, 4 heads, T = 64, vocabulary 65, batch 16, Adam), whose position embedding
is called on ids of shape (B, T) since this session, so the monitor's hooks split every tensor's gradient into
examples; ``gpt-pos``, the same with the position ids built in the benchmark (kept for comparison with earlier
figures, when the zoo passed (T,) and that tensor took the torch.func fallback); ``tinygpt`` (``--model tinygpt``),
the 2-block GPT of earlier sessions (vocabulary 256, fused qkv).  Conditions, interleaved round by round on the same seeds:

- ``plain``: the training step alone (forward, mean loss, backward, optimizer step);
- ``monitor``: the same step with ``NoiseMonitor`` recording every step (per-example norms from the step's own
  backward, update norm, distance from init, moving averages, zarr appends every 64 steps), as a user gets it:
  the step's arithmetic on the background worker when torch's threads leave a core free (``background=None``;
  :mod:`gradlab.monitor.worker`: with ``OMP_NUM_THREADS=1`` on two cores, the second core), else on the training
  thread;
- ``monitor 1-thread``: the same with ``background=False``: everything on the training thread (the monitor's
  whole cost in CPU time; what ``monitor`` costs when torch's threads take every core);
- ``monitor noise``: every step, without the update norm and distance from init (``distances=False``);
- ``monitor sgd-upd``: every step, the update norm from SGD's own update (``distances="optimizer"``: no snapshot;
  Adam falls back to the snapshot, so on the GPTs this equals ``monitor``);
- ``monitor/16``: recording every 16th step;
- ``naive``: the step plus a per-example autograd loop (B extra forward/backward passes) for Σ‖gᵢ‖², what a
  monitor without the backward hooks would do.

Ratios are medians over rounds of (condition time / plain time) in the same round.  Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` per condition; on CPU each condition runs in a subprocess (``--memory``) and
reports how far its peak RSS during the steps rose above the RSS after set-up (Linux ``/proc``).  The monitor's
stores use its default chunk of 128 recorded steps.

- ``cockpit economy`` (MLP only, when ``cockpit-for-pytorch`` imports): Cockpit's economy configuration (Alpha,
  Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize) tracked every step, through
  BackPACK's extended modules.

    OMP_NUM_THREADS=1 python benchmarks/bench_monitor.py              # both models, timings
    python benchmarks/bench_monitor.py --model mlp                    # torch's threads on every core: no worker
    python benchmarks/bench_monitor.py --model mlp --rounds 7 --memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.monitor import NoiseMonitor


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 4, layers: int = 2, t: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


def _batched_pos_gpt() -> type:
    from gradlab.models.gpt import GPT

    class BatchedPosGPT(GPT):
        """The zoo gpt with position ids of shape (B, T) (the zoo passes (T,), broadcast over the batch, which the
        monitor's hooks cannot split into examples: that tensor goes to the torch.func fallback)."""

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            b, t = idx.shape
            pos = torch.arange(t, device=idx.device).expand(b, t)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return BatchedPosGPT


BatchedPosGPT = _batched_pos_gpt()


def setup(name: str, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10)).to(device)
        data = [(torch.rand(64, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device))
                for _ in range(8)]
        return model, torch.optim.SGD(model.parameters(), lr=0.01), "cross-entropy", data
    if name in ("gpt", "gpt-pos"):  # the zoo's gpt (issue 12's size): 4 blocks, n_embd 128, 4 heads, T 64, V 65
        from gradlab.models import build_model

        model = build_model("gpt", (64,), 65, n_layer=4, n_embd=128, n_head=4).to(device)
        if name == "gpt-pos":
            model.__class__ = BatchedPosGPT
        vocab = 65
    else:
        model = TinyGPT().to(device)
        vocab = 256
    data = []
    for _ in range(8):
        ids = torch.randint(0, vocab, (16, 65), generator=g).to(device)
        data.append((ids[:, :-1], ids[:, 1:]))
    return model, torch.optim.Adam(model.parameters(), lr=3e-4), "lm", data


def cockpit_available() -> str | None:
    """None if Cockpit (``cockpit-for-pytorch``, with BackPACK) imports, else why not.  Cockpit 1.0.2 imports
    ``pkg_resources`` only to read its own version; setuptools ≥ 81 has none, so a stand-in is provided here."""
    import importlib.metadata as md
    import types

    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")

            class DistributionNotFound(Exception):
                pass

            def get_distribution(name: str) -> Any:
                for candidate in (name, f"{name}-for-pytorch"):
                    try:
                        return types.SimpleNamespace(version=md.version(candidate))
                    except md.PackageNotFoundError:
                        pass
                raise DistributionNotFound(name)

            shim.DistributionNotFound, shim.get_distribution = DistributionNotFound, get_distribution
            sys.modules["pkg_resources"] = shim
    try:
        import cockpit  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional peer: report and skip
        return f"{type(exc).__name__}: {exc}"
    return None


def make_cockpit_step(name: str, device: str):
    """Cockpit's ``economy`` configuration tracked every step (its quantities need BackPACK's extended modules:
    the MLP only), the same model, data, optimizer and seeds as the other conditions."""
    why = cockpit_available()
    if why is not None:
        raise SystemExit(f"Cockpit does not import: {why}")
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    model, opt, _, data = setup(name, device)
    model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss(reduction="mean"))
    individual = nn.CrossEntropyLoss(reduction="none")
    ck = Cockpit(list(model.parameters()), quantities=configuration("economy"))
    i = [0]

    def step() -> None:
        t = i[0]  # global steps 0, 1, 2, ... (Alpha's end of step t reads what its start cached at t - 1)
        i[0] += 1
        x, y = data[t % len(data)]
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = lossfunc(out, y)
        losses = individual(out, y)
        with ck(t, info={"batch_size": y.shape[0], "individual_losses": losses, "loss": loss, "optimizer": opt}):
            loss.backward(create_graph=ck.create_graph(t))
        opt.step()
    return step, None


def make_step(cond: str, name: str, device: str, tmp: Path):
    if cond == "cockpit economy":
        return make_cockpit_step(name, device)
    from gradlab.task import resolve_loss

    model, opt, loss_name, data = setup(name, device)
    fn = resolve_loss(loss_name)
    mon = None
    if cond.startswith("monitor"):
        every = 16 if cond == "monitor/16" else 1
        mon = NoiseMonitor(model, loss_name, tmp / f"{name}-{cond.replace('/', '_').replace(' ', '_')}.zarr",
                           optimizer=opt, every=every,
                           distances={"monitor noise": False, "monitor sgd-upd": "optimizer"}.get(cond, True),
                           background=False if cond == "monitor 1-thread" else None)
    params = list(model.parameters())
    i = [0]

    def step() -> None:
        batch = data[i[0] % len(data)]
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            mon.loss(batch).backward()
        else:
            fn(model, batch).mean().backward()
            if cond == "naive":
                x, y = batch
                total = 0.0
                for j in range(y.shape[0]):
                    gs = torch.autograd.grad(fn(model, (x[j:j + 1], y[j:j + 1]))[0], params)
                    total += sum(float((g_ * g_).sum()) for g_ in gs)
        opt.step()
    return step, mon


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: conditions timed on steps/8 steps per round (they are 10-200x slower)
SLOW = ("naive", "cockpit economy")


def time_conditions(name: str, conds: list[str], rounds: int, steps: int, device: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {c: [] for c in conds}
    with tempfile.TemporaryDirectory() as d:
        runners = {c: make_step(c, name, device, Path(d)) for c in conds}
        for c, (step, _) in runners.items():  # warm-up (and the optimizer's first-step imports)
            for _ in range(3 if c not in SLOW else 1):
                step()
        for _ in range(rounds):
            for c, (step, _) in runners.items():
                n = steps if c not in SLOW else max(2, steps // 8)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                sync(device)
                times[c].append((time.perf_counter() - t0) / n)
        for _, mon in runners.values():
            if mon is not None:
                mon.close()
    return times


def peak_memory(name: str, cond: str, device: str, steps: int) -> float:
    """Peak memory in MiB of ``steps`` training steps of one condition (CUDA: allocated; CPU: process RSS)."""
    if device == "cuda":
        with tempfile.TemporaryDirectory() as d:
            torch.cuda.reset_peak_memory_stats()
            step, mon = make_step(cond, name, device, Path(d))
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            if mon is not None:
                mon.close()
            return torch.cuda.max_memory_allocated() / 2**20
    # peak RSS while training (VmHWM after resetting it through /proc/self/clear_refs once the model, the data and
    # the imports are in memory), minus the RSS at that moment: the memory the steps themselves add
    code = (f"import sys, tempfile, pathlib; sys.argv=['x']; import benchmarks.bench_monitor as b; "
            f"d=tempfile.mkdtemp(); s,m=b.make_step({cond!r},{name!r},'cpu',pathlib.Path(d)); "
            f"kb=lambda k: int([l for l in open('/proc/self/status') if l.startswith(k)][0].split()[1]); "
            f"open('/proc/self/clear_refs','w').write('5'); base=kb('VmRSS'); "
            f"[s() for _ in range({steps})]; print(kb('VmHWM') - base); m and m.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "gpt", "gpt-pos", "tinygpt", "both"], default="both",
                   help="both: mlp, gpt (the zoo's) and gpt-pos (the zoo's with (B, T) position ids); tinygpt: "
                        "the small GPT of earlier sessions")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=32, help="steps per condition per round (naive, cockpit: steps/8)")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--memory", action="store_true", help="also measure peak memory per condition")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    models = ["mlp", "gpt", "gpt-pos"] if args.model == "both" else [args.model]
    conds = ["plain", "monitor", "monitor 1-thread", "monitor noise", "monitor sgd-upd", "monitor/16"] + \
        ([] if args.no_naive else
                                                                                   ["naive"])
    from gradlab.monitor.worker import spare_core

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds × {args.steps} steps; background worker "
          f"{'on (a core is free)' if spare_core() and args.device == 'cpu' else 'off'}")
    results = {}
    no_cockpit = cockpit_available()
    if no_cockpit:
        print(f"Cockpit not compared ({no_cockpit}; pip install --no-deps cockpit-for-pytorch "
              "backpack-for-pytorch einops unfoldNd json-tricks)")
    all_conds = conds
    for name in models:
        # Cockpit's quantities need BackPACK-extended modules: the MLP only
        conds = all_conds + (["cockpit economy"] if name == "mlp" and not no_cockpit else [])
        t = time_conditions(name, conds, args.rounds, args.steps, args.device)
        base = t["plain"]
        res = {"plain_ms": 1e3 * statistics.median(base)}
        print(f"\n{name}: plain step {res['plain_ms']:.2f} ms (median over rounds)")
        for c in conds[1:]:
            ratios = [a / b for a, b in zip(t[c], base)]
            res[c] = {"ms": 1e3 * statistics.median(t[c]), "ratio": statistics.median(ratios),
                      "ratio_range": [min(ratios), max(ratios)]}
            print(f"  {c:16s} {res[c]['ms']:9.2f} ms   ratio to plain {res[c]['ratio']:.3f}× "
                  f"(rounds: {min(ratios):.3f}–{max(ratios):.3f})")
        if "naive" in res:
            print(f"  monitor vs naive per-example loop: {res['naive']['ms'] / res['monitor']['ms']:.1f}× faster")
        if "cockpit economy" in res:
            print(f"  monitor vs Cockpit economy (every step): "
                  f"{res['cockpit economy']['ms'] / res['monitor']['ms']:.1f}× faster")
        if args.memory:
            for c in conds:
                mib = peak_memory(name, c, args.device, 8)
                res.setdefault("peak_mib", {})[c] = mib
                print(f"  peak memory {c:13s} {mib:8.1f} MiB" + (" above set-up" if args.device == "cpu" else ""))
        results[name] = res
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
