"""Per-example gradient Gram matrices Kᵢⱼ = gᵢ·gⱼ, one per parameter tensor, without per-example gradients.

For an ``nn.Linear`` applied once per forward to inputs of shape (N, in), example i's weight gradient is the outer
product gᵢ = δᵢ aᵢᵀ of its output gradient δᵢ = ∂ℓᵢ/∂zᵢ and its input aᵢ, so

    gᵢ·gⱼ = (aᵢ·aⱼ)(δᵢ·δⱼ)          (weights)          gᵢ·gⱼ = δᵢ·δⱼ          (biases)

i.e. K_W = (A Aᵀ) ∘ (D Dᵀ) and K_b = D Dᵀ (Goodfellow 2015, "Efficient per-example gradient computations";
Rochette et al. 2019; SCIENCE.md "The two probe protocols").  A and D come from forward hooks on a private copy of
the model and one ``torch.autograd.grad`` of the *sum* of per-example losses, which makes row i of D example i's
own output gradient -- provided examples do not interact.  The copy is therefore put in eval mode: batch norm uses
its running statistics and dropout is off (``model_mode = "eval"`` in the store attrs).  The caller's model is
never touched.

Parameters outside such linear layers (convolutions, norms, embeddings, a linear layer called twice or on
non-2-D inputs, or whose weight is tied to another module) fall back to per-example gradients from ``torch.func.vmap(grad(...))`` in chunks, then K = Γ Γᵀ
with Γ the (N, p) matrix of that tensor's per-example gradients (memory N·p for those tensors only; above
``max_fallback_bytes``, 2 GiB by default, K is assembled from blocks of rows, recomputing per-example gradients
block by block, so memory stays bounded for ResNet-sized models at the cost of more backward passes).

Forward/backward passes run in chunks of ``chunk_size`` examples, so autograd memory is bounded by a chunk; the
stored A and D are what one forward pass of N examples holds, and each K is N×N.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from gradlab.task import Batch, PerExampleLoss, batch_len, index_batch, to_run
from gradlab.task import cross_entropy as task_ce

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_sum(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σᵢ ℓᵢ with ℓᵢ the cross-entropy of example i (a sum, so that ∂/∂zᵢ is example i's own gradient)."""
    return F.cross_entropy(output, target, reduction="sum")


def _join(module: str, attr: str) -> str:
    """The parameter name of ``attr`` in module ``module`` ("" is the model itself: a bare nn.Linear)."""
    return f"{module}.{attr}" if module else attr


class _SummedLoss(nn.Module):
    """Σᵢ ℓᵢ of a per-example loss as a module, so ``torch.func.functional_call`` can swap ``model``'s tensors."""

    def __init__(self, model: nn.Module, loss: PerExampleLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(self.model, batch).sum()


SYM_BLOCK = 256  # below this many rows a Gram matrix is one GEMM


def sym_gram(x: torch.Tensor) -> torch.Tensor:
    """X Xᵀ for X (N, d), computing only the blocks on and below the diagonal (recursively halved down to
    ``SYM_BLOCK`` rows) and mirroring the rest: about 5/8 of the GEMM work for N = 1024."""
    n = x.shape[0]
    if n <= SYM_BLOCK:
        return x @ x.T
    h = n // 2
    out = x.new_empty(n, n)
    out[:h, :h] = sym_gram(x[:h])
    out[h:, h:] = sym_gram(x[h:])
    torch.mm(x[h:], x[:h].T, out=out[h:, :h])
    out[:h, h:] = out[h:, :h].T
    return out


@dataclass(frozen=True)
class GramResult:
    """Gram matrices and summed gradients of one draw of N examples.

    ``gram[name]``: (N, N) float64, Kᵢⱼ = gᵢ·gⱼ restricted to parameter tensor ``name``;
    ``grad_sum[name]``: Σᵢ gᵢ for that tensor (its shape, compute dtype; empty dict when the engine was built with
    ``grad_sum=False``, which saves the D^T A products); ``fallback``: names computed with
    torch.func per-example gradients instead of the linear-layer identity.
    """

    gram: dict[str, torch.Tensor]
    grad_sum: dict[str, torch.Tensor]
    fallback: tuple[str, ...]


class GramEngine:
    """Computes :class:`GramResult` for draws of examples at fixed parameters θ (the frozen protocol).

    Not thread-safe (calls hook its private model): use one engine per thread.

    Example (checked in ``tests/probe/test_gram.py`` against per-example autograd)::

        engine = GramEngine(model, ["layers.0.weight", "layers.0.bias"], dtype=torch.float64)
        res = engine(x, y)       # res.gram["layers.0.weight"][i, j] == g_i · g_j
    """

    def __init__(self, model: nn.Module, selected: Sequence[str], *, loss_fn: LossFn | None = None,
                 loss: PerExampleLoss | None = None, chunk_size: int = 256, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", grad_sum: bool = True,
                 max_fallback_bytes: int = 2 * 2**30) -> None:
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.selected = tuple(selected)
        names = {n for n, _ in self.model.named_parameters()}
        unknown = [n for n in self.selected if n not in names]
        if unknown:
            raise ValueError(f"parameters {unknown} are not in the model (it has {sorted(names)})")
        if loss is not None and loss_fn is not None:
            raise ValueError("pass either loss (per-example, fn(model, batch)) or loss_fn (summed, fn(output, y))")
        if loss is None:  # the legacy summed loss of (output, target) as a per-example contract
            fn = loss_fn or cross_entropy_sum
            loss = (lambda model, batch: fn(model(batch[0]), batch[1])) if loss_fn is not None else task_ce
        self.loss = loss
        self.chunk_size = int(chunk_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.want_grad_sum = bool(grad_sum)
        self.max_fallback_bytes = int(max_fallback_bytes)
        self._linear: dict[str, nn.Linear] | None = None  # module name -> module, decided on first call
        self._fallback: tuple[str, ...] = ()

    # -- which tensors take the linear-layer identity -------------------------------------------------------------
    def _classify(self, batch1: Batch) -> None:
        linears = {name: m for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        calls: dict[str, list[int]] = {name: [] for name in linears}
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: calls[name].append(inp[0].dim()))
                 for name, m in linears.items()]
        try:
            with torch.no_grad():
                self.loss(self.model, batch1)
        finally:
            for h in hooks:
                h.remove()
        owners: dict[int, int] = {}  # a tensor shared by several modules (tied weights) takes the fallback
        for mod in self.model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        eligible = {name: m for name, m in linears.items() if calls[name] == [2]
                    and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))}
        owned = {_join(name, attr) for name, m in eligible.items() for attr in ("weight", "bias")
                 if getattr(m, attr, None) is not None}
        self._linear = {name: m for name, m in eligible.items()
                        if any(_join(name, a) in self.selected for a in ("weight", "bias"))}
        self._fallback = tuple(n for n in self.selected if n not in owned)

    def __call__(self, batch: Batch, y: torch.Tensor | None = None) -> GramResult:
        """Gram matrices and summed gradients of the N examples of ``batch`` (a batch pytree, or inputs ``x`` with
        targets ``y``); floating tensors are moved to the engine's dtype, every tensor to its device."""
        batch = to_run(batch if y is None else (batch, y), device=self.device, dtype=self.dtype)
        if self._linear is None:
            self._classify(index_batch(batch, slice(0, 1)))
        gram: dict[str, torch.Tensor] = {}
        grad_sum: dict[str, torch.Tensor] = {}
        if self._linear:
            self._linear_grams(batch, gram, grad_sum)
        if self._fallback:
            self._fallback_grams(batch, gram, grad_sum)
        return GramResult({n: gram[n] for n in self.selected},
                          {n: grad_sum[n] for n in self.selected} if self.want_grad_sum else {}, self._fallback)

    # -- linear-layer identity ------------------------------------------------------------------------------------
    def _linear_grams(self, batch: Batch, gram: dict[str, torch.Tensor],
                      grad_sum: dict[str, torch.Tensor]) -> None:
        linears = self._linear or {}
        acts: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        deltas: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        outs: dict[str, torch.Tensor] = {}

        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str) -> None:
            acts[name].append(inp[0].detach())
            outs[name] = out

        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: hook(mod, inp, out, name))
                 for name, m in linears.items()]
        # the layers' outputs must be part of a graph even when the inputs are integer ids or data
        weights = [m.weight for m in linears.values()]
        for w in weights:
            w.requires_grad_(True)
        try:
            for start in range(0, batch_len(batch), self.chunk_size):
                chunk = index_batch(batch, slice(start, start + self.chunk_size))
                outs.clear()
                with torch.enable_grad():
                    loss = self.loss(self.model, chunk).sum()
                    names = list(outs)
                    grads = torch.autograd.grad(loss, [outs[n] for n in names])
                for n, g in zip(names, grads):
                    deltas[n].append(g.detach())
        finally:
            for h in hooks:
                h.remove()
            for w in weights:
                w.requires_grad_(False)
        for name, mod in linears.items():
            a = torch.cat(acts[name])
            d = torch.cat(deltas[name])
            dd = sym_gram(d)  # in the compute dtype; the Hadamard product's rounding is that of the Grams' own
            wname, bname = _join(name, "weight"), _join(name, "bias")
            if wname in self.selected:
                gram[wname] = (sym_gram(a) * dd).double()
                if self.want_grad_sum:
                    grad_sum[wname] = d.T @ a
            if bname in self.selected and mod.bias is not None:
                gram[bname] = dd.double()
                grad_sum[bname] = d.sum(0)

    # -- generic fallback: torch.func per-example gradients -------------------------------------------------------
    def _fallback_grams(self, batch: Batch, gram: dict[str, torch.Tensor],
                        grad_sum: dict[str, torch.Tensor]) -> None:
        from torch.func import functional_call, grad, vmap

        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        fixed = {n: p for n, p in params.items() if n not in self._fallback}
        objective = _SummedLoss(self.model, self.loss)

        def loss_one(free: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
            state = {f"model.{n}": t for n, t in {**fixed, **free, **buffers}.items()}
            return functional_call(objective, state, (tree_map(lambda t: t[None], example),))

        per_example = vmap(grad(loss_one), in_dims=(None, 0))
        free = {n: params[n] for n in self._fallback}
        n_ex = batch_len(batch)

        def block_rows(i0: int, i1: int) -> dict[str, torch.Tensor]:
            """Per-example gradients Γ[i0:i1] of every fallback tensor, (i1 − i0, numel) each."""
            rows = {n: torch.empty((i1 - i0, params[n].numel()), dtype=self.dtype, device=self.device)
                    for n in self._fallback}
            for start in range(i0, i1, self.chunk_size):
                stop = min(start + self.chunk_size, i1)
                g = per_example(free, index_batch(batch, slice(start, stop)))
                for n in self._fallback:
                    rows[n][start - i0:stop - i0] = g[n].reshape(stop - start, -1)
            return rows

        # Γ of all N examples must fit max_fallback_bytes; otherwise K is built from row blocks, two at a time
        # (block J's gradients are recomputed for every earlier block I: more passes, bounded memory)
        row_bytes = sum(params[n].numel() for n in self._fallback) * torch.finfo(self.dtype).bits // 8
        block = n_ex if n_ex * row_bytes <= self.max_fallback_bytes else max(1, self.max_fallback_bytes // (2 * row_bytes))
        k = {n: torch.empty((n_ex, n_ex), dtype=self.dtype, device=self.device) for n in self._fallback}
        total = {n: torch.zeros(params[n].numel(), dtype=self.dtype, device=self.device) for n in self._fallback}
        starts = list(range(0, n_ex, block))
        for b, i0 in enumerate(starts):
            i1 = min(i0 + block, n_ex)
            gi = block_rows(i0, i1)
            for n in self._fallback:
                k[n][i0:i1, i0:i1] = sym_gram(gi[n])
                total[n] += gi[n].sum(0)
            for j0 in starts[b + 1:]:
                j1 = min(j0 + block, n_ex)
                gj = block_rows(j0, j1)
                for n in self._fallback:
                    torch.mm(gj[n], gi[n].T, out=k[n][j0:j1, i0:i1])
                    k[n][i0:i1, j0:j1] = k[n][j0:j1, i0:i1].T
        for n in self._fallback:
            gram[n] = k[n].double()
            grad_sum[n] = total[n].reshape(params[n].shape)
