"""Per-example gradient Gram matrices Kᵢⱼ = gᵢ·gⱼ, one per parameter tensor, exact, for any model and loss.

A task is (model, batch, per-example loss ``loss(model, batch) -> (B,)``, ``gradlab.task``); gᵢ = ∇ℓᵢ.  The engine
runs the loss on the batch in chunks of ``chunk_size`` examples, with forward hooks on the layers it knows, and takes
one ``torch.autograd.grad`` of the *sum* Σᵢ ℓᵢ with respect to those layers' outputs, so row i of each output
gradient δ is example i's own (examples must not interact: the engine's private copy of the model is in eval mode,
so batch norm uses its running statistics and dropout is off; ``model_mode = "eval"`` in the store attrs).  From a
layer's inputs and δ, ``gradlab.probe.gram_layers`` forms K without per-example autograd; per family and cost
(per pair of examples, T positions per example):

=================================  =====================================================================
layer                              exact form (chosen per layer)
=================================  =====================================================================
Linear (B, d) / (B, T…, d)         ghost Σ_{t,s}(a_it·a_js)(δ_it·δ_js): T²(d_in+d_out) per pair, or
Conv1d/2d (unfold, any groups)     materialised Γ_i = Σ_t δ_it a_itᵀ, K = ΓΓᵀ: d_in·d_out per pair;
                                   ghost iff T²(d_in + d_out) < d_in·d_out or Γ exceeds the memory budget
Embedding (ids (B, T…))            ghost Σ_{t,s}[id_it = id_js](δ_it·δ_js): T²(d+1), or scatter-summed
                                   Γ_i (V·d per pair); padding_idx rows get no gradient
LayerNorm, RMSNorm, GroupNorm,     Γ_i = Σ_positions δ_i∘x̂_i (weight), Σ δ_i (bias): always materialised
BatchNorm1d/2d (eval, running)
=================================  =====================================================================

A layer takes this fast path when it is called exactly once per forward, owns its parameters alone, sees the
examples on its input's first dimension (an Embedding may also see ids shared by the batch, (T,) or (1, T), as
position ids are: its output is then expanded to one copy per example so that δ is per example), and passes a
self-check on the first call: the Gram matrices of the first 3 examples must equal those of 3 single-example
backward passes (this catches, e.g., a weight also used outside the module's forward, ``F.linear(x, wte.weight)``).
Shared tensors fall back, except language-model weight tying (one matrix that is an Embedding's weight and a
Linear head's): both users materialise and add their per-example gradients into one Γ.  A model that is itself one
layer (module name "") is no exception.  Every other selected tensor falls back to per-example gradients from
``torch.func.vmap(grad(...))`` (``gradlab.probe.gram_fallback``; memory bounded by ``max_fallback_bytes``), listed
in ``GramResult.fallback``.

``copy=True`` (default) works on a private eval-mode copy in the engine's dtype and device; the caller's model is
never touched.  ``copy=False`` runs on the caller's model as it is (a training-time monitor): hooks are attached
only during the call, ``requires_grad`` flags are restored, the train/eval mode is left alone -- a batch norm that
normalises with batch statistics makes examples interact and is refused.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from gradlab import task
from gradlab.errors import UsageError
from gradlab.task import PerExampleLoss, batch_len, index_batch, inputs_targets, to_run

from .gram_fallback import VMAP_SAFE, fallback_grams
from .gram_layers import SYM_BLOCK, EmbeddingGram, LayerGram, LinearGram, family, sym_gram

__all__ = ["GramEngine", "GramResult", "LossFn", "SYM_BLOCK", "cross_entropy_sum", "sym_gram"]

LossFn = Callable[[Tensor, Tensor], Tensor]
SELF_CHECK_EXAMPLES = 3  # odd: a sequence length rarely equals it


def cross_entropy_sum(output: Tensor, target: Tensor) -> Tensor:
    """Σᵢ ℓᵢ with ℓᵢ the cross-entropy of example i (a legacy ``loss_fn``: (output, target) -> summed loss)."""
    return F.cross_entropy(output, target, reduction="sum")


@dataclass(frozen=True)
class GramResult:
    """Gram matrices and summed gradients of one draw of N examples.

    ``gram[name]``: (N, N) float64, Kᵢⱼ = gᵢ·gⱼ restricted to parameter tensor ``name``;
    ``grad_sum[name]``: Σᵢ gᵢ for that tensor (its shape, compute dtype; empty dict when the engine was built with
    ``grad_sum=False``); ``fallback``: names computed with torch.func per-example gradients instead of a layer
    identity.
    """

    gram: dict[str, Tensor]
    grad_sum: dict[str, Tensor]
    fallback: tuple[str, ...]


class GramEngine:
    """Computes :class:`GramResult` for draws of examples at fixed parameters θ (the frozen protocol).

    Not thread-safe (calls hook its model): use one engine per thread.

    Example (checked in ``tests/probe/test_gram.py`` against per-example autograd)::

        engine = GramEngine(model, ["layers.0.weight", "layers.0.bias"], dtype=torch.float64)
        res = engine((x, y))     # or engine(x, y); res.gram["layers.0.weight"][i, j] == g_i · g_j
    """

    def __init__(self, model: nn.Module, selected: Sequence[str], *, loss: PerExampleLoss = task.cross_entropy,
                 chunk_size: int = 256, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 grad_sum: bool = True, max_fallback_bytes: int = 2 * 2**30, copy: bool = True,
                 loss_fn: LossFn | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.copy = bool(copy)
        if self.copy:
            self.model = copy_module.deepcopy(model).to(device=device, dtype=dtype).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        else:
            self.model = model
        self.selected = tuple(selected)
        names = {n for n, _ in self.model.named_parameters()}
        unknown = [n for n in self.selected if n not in names]
        if unknown:
            raise ValueError(f"parameters {unknown} are not in the model (it has {sorted(names)})")
        if loss_fn is not None and loss is not task.cross_entropy:
            raise ValueError("pass either loss (per-example, fn(model, batch)) or loss_fn (summed, fn(output, y))")
        if loss_fn is not None:  # legacy (output, target) -> Σᵢ ℓᵢ on batches (x, y)
            self._total = self._vmap_total = _legacy_total(loss_fn)
        else:
            self._total = lambda m, b: loss(m, b).sum()
            self._vmap_total = VMAP_SAFE.get(loss, self._total)
        self.chunk_size = int(chunk_size)
        self.want_grad_sum = bool(grad_sum)
        self.max_fallback_bytes = int(max_fallback_bytes)
        self._layers: dict[str, LayerGram] | None = None  # module name -> handler, decided on the first call
        self._fallback: tuple[str, ...] = ()
        self._use_vmap = True

    # -- the call ---------------------------------------------------------------------------------------------------
    def __call__(self, *batch: Any) -> GramResult:
        """Gram matrices and summed gradients of the N examples of ``batch`` (a pytree of tensors with leading dim
        N, or the legacy ``engine(x, y)``); floating tensors are moved to the engine's dtype, all to its device."""
        if len(batch) not in (1, 2):
            raise TypeError(f"GramEngine takes one batch (or x, y), got {len(batch)} arguments")
        data = to_run(batch[0] if len(batch) == 1 else tuple(batch), device=self.device, dtype=self.dtype)
        n = batch_len(data)
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self._prepare()
            if self._layers is None:
                self._plan(data, n)
            gram: dict[str, Tensor] = {}
            grad_sum: dict[str, Tensor] = {}
            if self._layers:
                self._layer_grams(data, n, gram, grad_sum)
            if self._fallback:
                with torch.no_grad():  # per-example gradients are values (torch.func.grad ignores an outer no_grad)
                    k, s, self._use_vmap = fallback_grams(self.model, self._vmap_total, data, n, self._fallback,
                                                          chunk_size=self.chunk_size,
                                                          max_bytes=self.max_fallback_bytes, use_vmap=self._use_vmap)
                gram.update(k)
                grad_sum.update(s)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return GramResult({n: gram[n] for n in self.selected},
                          {n: grad_sum[n] for n in self.selected} if self.want_grad_sum else {}, self._fallback)

    def _prepare(self) -> None:
        """Only the selected tensors require grad (restored after the call); copy=False checks the model."""
        if not self.copy:
            for name, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                    raise UsageError(f"batch norm {name!r} normalises with batch statistics (training mode or no "
                                     "running statistics), so examples interact and per-example gradients are "
                                     "undefined; call model.eval() around the engine or build it with copy=True")
            wrong = [n for n, p in self.model.named_parameters()
                     if p.is_floating_point() and (p.dtype != self.dtype or p.device.type != self.device.type)]
            if wrong:
                p = dict(self.model.named_parameters())[wrong[0]]
                raise UsageError(f"copy=False runs on the model as it is, but parameter {wrong[0]!r} is {p.dtype} "
                                 f"on {p.device}, not {self.dtype} on {self.device}; build the engine with the "
                                 "model's dtype and device")
        chosen = set(self.selected)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in chosen)

    # -- which tensors take a layer identity ------------------------------------------------------------------------
    def _plan(self, data: Any, n: int) -> None:
        chosen = set(self.selected)
        owners: dict[int, list[nn.Module]] = {}  # a tensor shared by several modules (tied weights)
        for mod in self.model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(mod)
        canonical = {id(p): name for name, p in self.model.named_parameters()}
        stores: dict[int, dict[str, Any]] = {}
        candidates: dict[str, LayerGram] = {}
        for name, m in self.model.named_modules():
            cls = family(m)
            own = list(m.named_parameters(recurse=False))
            if cls is None or not own or not all(len(owners[id(p)]) == 1 or self._lm_tie(a, p, owners[id(p)], n)
                                                 for a, p in own):
                continue
            handler = cls(m, name, chosen, canonical)
            handler.tied = {a: stores.setdefault(id(p), {}) for a, p in own if len(owners[id(p)]) > 1}
            if handler.names:
                candidates[name] = handler
        self._layers = {}
        if candidates:
            try:
                self._layers = self._checked(candidates, data, n, broadcast=True)
            except Exception:  # the model rejected an expanded (per-example) position embedding: plain hooks only
                self._layers = self._checked(candidates, data, n, broadcast=False)
        owned = {p for h in self._layers.values() for p in h.names.values()}
        self._fallback = tuple(p for p in self.selected if p not in owned)

    def _lm_tie(self, attr: str, p: Tensor, users: list[nn.Module], n: int) -> bool:
        """Language-model weight tying: one (V, d) matrix that is an Embedding's weight and a Linear head's.  Its
        per-example gradient is the sum of both uses' (materialised, N·V·d within the memory budget)."""
        return (attr == "weight" and len(users) == 2 and {family(u) for u in users} == {EmbeddingGram, LinearGram}
                and n * p.numel() * p.element_size() <= self.max_fallback_bytes)

    def _checked(self, candidates: dict[str, LayerGram], data: Any, n: int, broadcast: bool
                 ) -> dict[str, LayerGram]:
        """The candidates called once per forward, on batched inputs, whose Gram matrices of the first k examples
        equal those of k single-example backward passes (the self-check)."""
        k = min(n, SELF_CHECK_EXAMPLES)
        calls = {name: 0 for name in candidates}
        ok = {name: True for name in candidates}
        for h in candidates.values():
            h.broadcast = False

        def observe(name: str, x: Any, out: Any) -> None:
            h = candidates[name]
            calls[name] += 1
            if not (isinstance(x, Tensor) and isinstance(out, Tensor)):
                ok[name] = False
                return
            if broadcast and isinstance(h, EmbeddingGram) and k > 1 and x.shape[:1] != (k,) \
                    and (x.dim() == 1 or x.shape[0] == 1):
                h.broadcast = True  # position ids shared by the batch: (T,) or (1, T)
            ok[name] &= (h.broadcast or (x.shape[:1] == (k,) and out.shape[:1] == (k,))) \
                and type(h).accepts(h.module, x, out)

        self._layers = candidates
        first = index_batch(data, slice(0, k))
        fast = self._run(first, k, observe=observe)
        reached = {name: h for name, h in candidates.items() if calls[name] == 1 and ok[name]}
        tensors = list(dict.fromkeys(p for h in reached.values() for p in h.names.values()))  # tied: once
        if not tensors:
            return {}
        params = dict(self.model.named_parameters())
        rows: dict[str, list[Tensor]] = {p: [] for p in tensors}
        for i in range(k):  # the definition: gᵢ = ∇ℓᵢ from a batch of one
            with torch.enable_grad():
                grads = torch.autograd.grad(self._total(self.model, index_batch(first, slice(i, i + 1))),
                                            [params[p] for p in tensors], allow_unused=True)
            for p, g in zip(tensors, grads):
                rows[p].append(torch.zeros_like(params[p]).flatten() if g is None else g.flatten())
        ref = {p: (lambda g: (g @ g.T).double())(torch.stack(v)) for p, v in rows.items()}
        floor = max(float(r.norm()) for r in ref.values())
        passed = {name: h for name, h in reached.items()
                  if all(_close(fast[p], ref[p], floor, self.dtype) for p in h.names.values())}
        tied = [h for h in passed.values() if h.tied]  # both users of a tied tensor, or neither
        return {name: h for name, h in passed.items()
                if all(sum(store is o.tied.get(a) for o in tied) == 2 for a, store in h.tied.items())}

    # -- layer identities -------------------------------------------------------------------------------------------
    def _layer_grams(self, data: Any, n: int, gram: dict[str, Tensor], grad_sum: dict[str, Tensor]) -> None:
        self._run(data, n)
        for h in (self._layers or {}).values():
            h.finish(gram, grad_sum, self.want_grad_sum)

    def _run(self, data: Any, n: int, *, observe: Callable[[str, Any, Any], None] | None = None
             ) -> dict[str, Tensor]:
        """Forward/backward in chunks, handing each hooked layer its input and output gradient.  With ``observe``
        (the plan, one chunk), return the Gram matrices of the layers reached."""
        layers = self._layers or {}
        seen: dict[str, tuple[Tensor, Any, Tensor]] = {}
        rows = 0

        def hook(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str) -> Any:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if observe is not None:
                observe(name, x, out)
            if not (isinstance(x, Tensor) and isinstance(out, Tensor) and out.requires_grad) or name in seen:
                return None
            if layers[name].broadcast:  # ids shared by the batch: give each example its own copy, so δ is its own
                out = out.unsqueeze(0) if x.dim() == 1 else out
                out = out.expand(rows, *out.shape[1:])
            seen[name] = (x.detach(), get_gradient_edge(out), out)
            return out

        handles = [h.module.register_forward_hook(
            lambda mod, args, kwargs, out, name=name: hook(args, kwargs, out, name), with_kwargs=True)
            for name, h in layers.items()]
        for h in layers.values():
            h.begin(n, self.max_fallback_bytes)
        gram: dict[str, Tensor] = {}
        try:
            for start in range(0, n, self.chunk_size):
                chunk = index_batch(data, slice(start, start + self.chunk_size))
                rows = batch_len(chunk)
                seen.clear()
                with torch.enable_grad():
                    total = self._total(self.model, chunk)
                    names = list(seen)
                    grads = torch.autograd.grad(total, [seen[m][1] for m in names], allow_unused=True)
                if observe is None and len(names) != len(layers):
                    missing = sorted(set(layers) - set(names))
                    raise RuntimeError(f"layers {missing} were not reached on examples {start}.. although they were "
                                       "on the first examples; build the engine for this batch's model path")
                for m, g in zip(names, grads):
                    x, _, out = seen[m]
                    layers[m].collect(x, torch.zeros_like(out) if g is None else g)
                seen.clear()
                if observe is not None:
                    for m in names:
                        layers[m].finish(gram, {}, False)
                    break
        finally:
            for handle in handles:
                handle.remove()
        return gram


def _close(fast: Tensor, ref: Tensor, floor: float, dtype: torch.dtype) -> bool:
    """Agreement of two Gram matrices up to the rounding of the compute ``dtype`` (relative to their size and to the
    largest Gram checked).  Both are float64 tensors; their rounding is that of ``dtype``."""
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    return fast.shape == ref.shape and float((fast - ref).norm()) <= tol * (float(ref.norm() + fast.norm()) + floor)


def _legacy_total(loss_fn: LossFn) -> Callable[[nn.Module, Any], Tensor]:
    def total(model: nn.Module, batch: Any) -> Tensor:
        x, y = inputs_targets(batch)
        return loss_fn(model(x), y)

    return total
