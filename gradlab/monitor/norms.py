"""Per-example squared gradient norms ‖gᵢ‖² per parameter tensor, from the user's own backward pass.

Forward hooks keep each supported module's input; a hook on its output receives the output gradient δ of the
backward pass the user runs (nanoGNS; Goodfellow 2015; Li et al. 2021's ghost norms).  Nothing is re-run and no
per-example gradient is materialised except where that is the cheaper way (long sequences are not):

- ``nn.Linear`` on (B, d): gᵢ = δᵢ aᵢᵀ, so ‖gᵢ‖² = ‖aᵢ‖²‖δᵢ‖² (weight), ‖δᵢ‖² (bias).
- ``nn.Linear`` on (B, T…, d) or called several times per forward (positions t): gᵢ = Σ_t δ_it a_itᵀ and
  ‖gᵢ‖² = Σ_{t,s} (a_it·a_is)(δ_it·δ_is) (Gram of Grams, cost T²(d_in + d_out)) or ‖Σ_t δ_it a_itᵀ‖² materialised
  (cost T·d_in·d_out), whichever is cheaper (an input Gram a aᵀ read by several layers -- q, k, v -- is computed
  once); bias ‖Σ_t δ_it‖².
- ``nn.Embedding``: gᵢ adds δ_it to the row of token t: ‖gᵢ‖² = Σ_{t,s: id_t = id_s ≠ pad} δ_it·δ_is (T² d), or
  for a vocabulary V ≤ T² the per-example gradients scattered into (B, V, d) and squared (V d).
- ``nn.LayerNorm``: weight gᵢ = Σ_t δ_it ⊙ x̂_it, bias Σ_t δ_it (x̂ the normalised input).
- ``nn.Conv2d`` (groups = 1, zero padding): a Linear on the unfolded patches, T = output positions.
- transformers' ``Conv1D`` (GPT-2's projections, y = xW + b with W (d_in, d_out)): a Linear with Wᵀ.

Every other parameter (and one shared by two modules, e.g. tied embeddings, or used by its module and also
directly in the forward, e.g. ``F.linear(h, self.emb.weight)``: :meth:`PerExampleNorms.check_uses` finds those in
the autograd graph of the first recorded step) is a *fallback* parameter: its
per-example gradients come from ``torch.func.vmap(grad(...))`` over the examples (an extra forward/backward on the
batch for those parameters only), or, where the loss cannot be vmapped (data-dependent checks), from one
forward/backward per example; where both fail (batch norm in training mode, random ops) the parameter is
*excluded* and the store says so.  The captured gradients are those of the backpropagated scalar L = Σᵢ wᵢℓᵢ
(w from a hook on the per-example losses), so row i carries wᵢgᵢ -- exact provided examples do not interact
(no batch norm in training mode).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sq_rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


def linear_sq_norms(a: Tensor, d: Tensor, grams: dict[int, Tensor] | None = None, key: int = 0) -> Tensor:
    """‖Σ_t d_t a_tᵀ‖² per example for a (B, T, d_in), d (B, T, d_out) (T = 1: ‖a‖²‖d‖²).

    ``grams``: a cache of input Grams a aᵀ keyed by ``key`` (the id of the module input), shared by the layers that read the same input
    tensor (the query, key and value projections of an attention block); the cache costs nothing when the Gram of
    Grams is counted at a shared input's full price (T²(d_in + d_out) per example against T·d_in·d_out)."""
    if a.shape[1] == 1:
        return _sq_rows(a) * _sq_rows(d)
    t, din, dout = a.shape[1], a.shape[2], d.shape[2]
    cached = grams is not None and key in grams
    if t * (dout + (0 if cached else din)) <= din * dout:
        if cached:
            aa = grams[key]
        else:
            aa = torch.bmm(a, a.transpose(1, 2))
            if grams is not None:
                grams[key] = aa
        return (aa * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
    return _sq_rows(torch.bmm(d.transpose(1, 2), a))


def _common(a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """A module's input and output gradient in one dtype: under ``torch.autocast`` a Linear or Conv2d reads a
    float32 input and its output (and output gradient) is bfloat16/float16; both are then taken in the wider dtype
    (``torch.promote_types``: float32).  Tensors of one dtype are returned as they are."""
    if a.dtype == d.dtype:
        return a, d
    dt = torch.promote_types(a.dtype, d.dtype)
    return a.to(dt), d.to(dt)


def _lead(x: Any) -> int:
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() else -1


def _cat1(parts: list[Tensor]) -> Tensor:
    """Concatenate along the positions (dim 1); one part is returned as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _position_ids(module: nn.Module, ids: Any) -> bool:
    """An embedding called on 0, 1, …, N − 1 of shape (N,): position ids without the batch dimension (the zoo gpt's
    ``wpe(arange(T))``), told apart by their values when N happens to equal the batch size (a batch whose i-th
    example is token i is the one case this misreads)."""
    return isinstance(module, nn.Embedding) and isinstance(ids, Tensor) and ids.dim() == 1 and \
        bool(torch.equal(ids, torch.arange(ids.shape[0], device=ids.device, dtype=ids.dtype)))


def _as_btd(x: Tensor, d: int) -> Tensor:
    return x.reshape(x.shape[0], -1, d)


class _Capture:
    """Inputs and output gradients of one module call."""

    __slots__ = ("inp", "grad")

    def __init__(self, inp: Any) -> None:
        self.inp = inp
        self.grad: Tensor | None = None


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): y = x W + b with W of shape (d_in, d_out), a Linear with Wᵀ."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def _own_forward(module: nn.Module, base: type) -> bool:
    """The module computes what ``base`` computes: a subclass that overrides ``forward`` (a masked or
    reparametrised weight, say) may use its parameters otherwise, and goes to the fallback."""
    return type(module).forward is base.forward


def supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return _own_forward(module, nn.Linear)
    if _is_hf_conv1d(module):
        return True
    if isinstance(module, nn.Embedding):
        return not module.sparse and not module.scale_grad_by_freq and _own_forward(module, nn.Embedding)
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine and _own_forward(module, nn.LayerNorm)
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str) and \
            _own_forward(module, nn.Conv2d) and type(module)._conv_forward is nn.Conv2d._conv_forward
    return False


class PerExampleNorms:
    """Hooks on a model's supported modules; :meth:`collect` returns per-example ‖gᵢ‖² (unscaled by w) per tensor.

    Only active between :meth:`arm` and :meth:`collect`; otherwise the hooks return at once.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        names = {id(p): n for n, p in model.named_parameters()}
        owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for module in model.modules():
            for role, p in module.named_parameters(recurse=False):
                owners[id(p)].append((module, role))
        self.modules: dict[nn.Module, dict[str, str]] = {}  # module -> role -> parameter name
        self.fallback: list[str] = []
        for pid, name in names.items():
            own = owners[pid]
            if len(own) == 1 and supported(own[0][0]) and own[0][1] in ("weight", "bias"):
                self.modules.setdefault(own[0][0], {})[own[0][1]] = name
            else:
                self.fallback.append(name)
        self.active = False
        self.unbatched: list[str] = []  # parameters of modules once called without the batch dimension
        self._calls: dict[nn.Module, list[_Capture]] = defaultdict(list)
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def arm(self) -> dict[nn.Module, list[_Capture]]:
        """Capture the module calls of the next forward into a new session, returned (a loss() call keeps its own
        session, so that two forwards backpropagated together, or one never backpropagated, stay apart)."""
        self._calls = defaultdict(list)
        self.active = True
        return self._calls

    def disarm(self) -> None:
        self.active = False
        self._calls = defaultdict(list)  # the sessions handed out stay as they are

    def check_uses(self, root: Tensor) -> list[str]:
        """Unhook, for good, the parameters that the graph of ``root`` (this forward's per-example losses) uses more
        often than their module was called -- a weight also used directly (``x @ self.a.weight``, an output layer
        tied functionally to an embedding): the module's inputs and output gradients do not see those uses.  They
        join :attr:`unbatched` and :attr:`fallback` (per-example gradients by torch.func); returns their names."""
        params = dict(self.model.named_parameters())
        wanted = {id(params[name]): name for roles in self.modules.values() for name in roles.values()}
        uses = parameter_uses(root, wanted)
        moved = []
        for module in list(self.modules):
            calls = len(self._calls.get(module, []))
            roles = self.modules[module]
            for role, name in list(roles.items()):
                if uses.get(name, 0) > calls:
                    del roles[role]
                    moved.append(name)
            if not roles:
                del self.modules[module]
        self.unbatched.extend(moved)
        self.fallback.extend(moved)
        return moved

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self.active or not isinstance(output, Tensor) or not output.requires_grad or module not in self.modules:
            return
        cap = _Capture(inputs[0])
        self._calls[module].append(cap)

        def hook(grad: Tensor, cap: _Capture = cap) -> None:
            cap.grad = grad.detach()

        output.register_hook(hook)

    def collect(self, n: int | None = None, sums: dict[str, Tensor] | None = None,
                session: dict[nn.Module, list[_Capture]] | None = None) -> dict[str, Tensor]:
        """Per-example ‖wᵢgᵢ‖² per parameter name for the captured backward passes (then forgets them); with
        ``sums``, also fills it with Σᵢ wᵢgᵢ of the Linear layers on (B, d) (:meth:`_module_sums`).

        A module whose outputs got no gradient in this backward contributes nothing (its parameters are absent).
        With ``n`` (the examples of the batch), a module called on inputs whose leading dimension is not n (e.g.
        position embeddings of shape (1, T) broadcast over the batch), or an embedding called on position ids
        0…N−1 of shape (N,) (also when N = n), is unhooked for good: its parameters are appended to
        :attr:`unbatched` and to :attr:`fallback` (per-example gradients by torch.func).  Other unbatched inputs
        whose leading dimension equals n cannot be told apart: give such modules batched inputs."""
        return self.compute(self.take(n, session), sums)

    def take(self, n: int | None = None, session: dict[nn.Module, list[_Capture]] | None = None
             ) -> list[tuple[nn.Module, dict[str, str], list[_Capture]]]:
        """The first half of :meth:`collect`: the captured calls of ``session`` (default: the current one) to compute
        from (each module with its roles), the unbatched modules unhooked; the captures are forgotten here (the
        next backward may be captured meanwhile)."""
        plan = []
        session = self._calls if session is None else session
        for module, calls in session.items():
            if module not in self.modules:  # unhooked since it was called (check_uses)
                continue
            calls = [c for c in calls if c.grad is not None]
            if n is not None and any(_lead(c.inp) != n or c.grad.shape[0] != n or _position_ids(module, c.inp)
                                     for c in calls):
                names = list(self.modules.pop(module).values())
                self.unbatched.extend(names)
                self.fallback.extend(names)
                continue
            if calls:
                plan.append((module, dict(self.modules[module]), calls))
        session.clear()
        return plan

    def compute(self, plan: list[tuple[nn.Module, dict[str, str], list[_Capture]]],
                sums: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The second half of :meth:`collect`: the per-example norms of a :meth:`take` (arithmetic only: it may run
        on another thread)."""
        out: dict[str, Tensor] = {}
        grams: dict[int, Tensor] = {}  # input Grams shared by layers reading one tensor (this plan only)
        for module, roles, calls in plan:
            out.update(self._module_norms(module, calls, roles, grams))
            if sums is not None:
                sums.update(self._module_sums(module, calls, roles))
        return out

    def _module_sums(self, module: nn.Module, calls: list[_Capture], roles: dict[str, str]) -> dict[str, Tensor]:
        """Σᵢ wᵢgᵢ of a Linear on (B, d) called once -- what its parameters' ``.grad`` holds when nothing else
        enters the backpropagated loss (one GEMM; :meth:`collect` computes it on request)."""
        if not isinstance(module, nn.Linear) or len(calls) != 1 or calls[0].inp.dim() != 2:
            return {}
        a, d = _common(calls[0].inp.detach(), calls[0].grad)
        res = {}
        if "weight" in roles:
            res[roles["weight"]] = d.t() @ a
        if "bias" in roles:
            res[roles["bias"]] = d.sum(0)
        low = min((calls[0].inp.dtype, calls[0].grad.dtype), key=lambda t: torch.finfo(t).bits)
        if res and low != next(iter(res.values())).dtype:  # autocast: the backward's own product was taken in ``low``
            res = {k: v.to(low) for k, v in res.items()}
        return res

    def _module_norms(self, module: nn.Module, calls: list[_Capture], roles: dict[str, str],
                      grams: dict[int, Tensor]) -> dict[str, Tensor]:
        res: dict[str, Tensor] = {}
        linear = isinstance(module, nn.Linear) or _is_hf_conv1d(module)  # ‖gᵢ‖² does not see the transpose
        if linear and len(calls) == 1 and calls[0].inp.dim() == 2:  # the common case
            a, d = _common(calls[0].inp.detach(), calls[0].grad)
            d2 = (d * d).sum(1)
            if "weight" in roles:
                res[roles["weight"]] = (a * a).sum(1) * d2
            if "bias" in roles:
                res[roles["bias"]] = d2
        elif linear:
            d_in, d_out = _linear_dims(module)
            a = _cat1([_as_btd(c.inp.detach(), d_in) for c in calls])
            d = _cat1([_as_btd(c.grad, d_out) for c in calls])
            a, d = _common(a, d)
            # one call: the input tensor object (alive in the capture) keys the cache of input Grams
            cache, key = (grams, id(calls[0].inp)) if len(calls) == 1 else (None, 0)
            if "weight" in roles:
                res[roles["weight"]] = linear_sq_norms(a, d, cache, key)
            if "bias" in roles:
                res[roles["bias"]] = _sq_rows(d.sum(1))
        elif isinstance(module, nn.Embedding):
            ids = _cat1([c.inp.reshape(c.inp.shape[0], -1) for c in calls])
            d = _cat1([_as_btd(c.grad, module.embedding_dim) for c in calls])
            if module.padding_idx is not None:
                d = d * (ids != module.padding_idx).unsqueeze(-1).to(d.dtype)
            b, t, dim = d.shape
            v = module.num_embeddings
            if ids.shape[1] == 1:
                res[roles["weight"]] = _sq_rows(d)
            elif v <= t * t and b * v * dim <= 2**25:  # small vocabulary: the per-example gradients, scattered
                g = d.new_zeros(b, v, dim)
                g.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, dim), d)
                res[roles["weight"]] = _sq_rows(g)
            else:
                same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(d.dtype)
                res[roles["weight"]] = (same * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
        elif isinstance(module, nn.LayerNorm):
            shape = tuple(module.normalized_shape)
            n = 1
            for s in shape:
                n *= s
            gw, gb = 0, 0
            for c in calls:
                x = c.inp.detach()
                xhat = F.layer_norm(x, shape, None, None, module.eps)
                dd = c.grad.reshape(x.shape[0], -1, n)
                gw = gw + (dd * xhat.reshape(x.shape[0], -1, n)).sum(1)
                gb = gb + dd.sum(1)
            if "weight" in roles:
                res[roles["weight"]] = _sq_rows(gw)
            if "bias" in roles:
                res[roles["bias"]] = _sq_rows(gb)
        elif isinstance(module, nn.Conv2d):
            a_parts, d_parts = [], []
            for c in calls:
                x = c.inp.detach()
                cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                stride=module.stride)  # (B, C k k, L)
                a_parts.append(cols.transpose(1, 2))
                d_parts.append(c.grad.reshape(x.shape[0], module.out_channels, -1).transpose(1, 2))
            a, d = _common(_cat1(a_parts), _cat1(d_parts))
            if "weight" in roles:
                res[roles["weight"]] = linear_sq_norms(a, d)
            if "bias" in roles:
                res[roles["bias"]] = _sq_rows(d.sum(1))
        return res


def parameter_uses(root: Tensor, wanted: dict[int, str]) -> dict[str, int]:
    """For the parameters ``wanted`` (id -> name): how many edges of ``root``'s autograd graph lead into each one's
    gradient accumulator -- one per use of the parameter in the computation of ``root``."""
    uses = dict.fromkeys(wanted.values(), 0)
    fn = root.grad_fn
    if fn is None:
        return uses
    seen = {fn}
    stack = [fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                name = wanted.get(id(var))
                if name is not None:
                    uses[name] += 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


def fallback_sq_norms(model: nn.Module, loss: Callable[[nn.Module, Any], Tensor], batch: Any,
                      names: list[str]) -> dict[str, Tensor]:
    """Per-example ‖∂ℓᵢ/∂p‖² of the fallback parameters ``names``: by :func:`vmap_sq_norms`, or, where torch.func
    cannot map the loss, :func:`loop_sq_norms`; raises what the loop raises."""
    # the user's run must not notice: no random number drawn from its generators, no buffer (batch norm's running
    # statistics) updated by these extra forwards
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), _swapped(model, {n: b.clone() for n, b in model.named_buffers()}):
        try:
            return vmap_sq_norms(model, loss, batch, names)
        except Exception:  # noqa: BLE001 - torch.func cannot map this loss: one example at a time
            return loop_sq_norms(model, loss, batch, names)


def vmap_sq_norms(model: nn.Module, loss: Callable[[nn.Module, Any], Tensor], batch: Any,
                  names: list[str]) -> dict[str, Tensor]:
    """Per-example ‖∂ℓᵢ/∂p‖² for the parameters ``names`` by ``torch.func.vmap(grad(...))`` over the examples.

    Raises whatever torch.func raises for models it cannot map over (the caller excludes those parameters).
    """
    from torch.func import grad, vmap
    from torch.utils._pytree import tree_map

    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update({n: b for n, b in model.named_buffers()})
    wanted = {n: params[n].detach() for n in names}

    def one(w: dict[str, Tensor], example: Any) -> Tensor:
        ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        with _swapped(model, {**fixed, **w}):
            return loss(model, ex)[0]

    import warnings

    with warnings.catch_warnings():  # torch's per-op "no batching rule, falling back to a loop" notices, each step
        warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented the "
                                "batching rule.*")
        grads = vmap(grad(one), in_dims=(None, 0))(wanted, batch)
    return {n: _sq_rows(g) for n, g in grads.items()}


def loop_sq_norms(model: nn.Module, loss: Callable[[nn.Module, Any], Tensor], batch: Any,
                  names: list[str]) -> dict[str, Tensor]:
    """The same as :func:`vmap_sq_norms` by one forward/backward per example (for losses that vmap cannot map:
    data-dependent checks, ``.item()``); raises what the model raises on a batch of one example."""
    from gradlab.task import batch_len, index_batch

    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    rows = []
    for i in range(batch_len(batch)):
        with torch.enable_grad():
            li = loss(model, index_batch(batch, slice(i, i + 1)))[0]
            gs = torch.autograd.grad(li, wanted, allow_unused=True)
        rows.append([torch.zeros((), dtype=p.dtype, device=p.device) if g is None else g.detach().pow(2).sum()
                     for p, g in zip(wanted, gs)])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


class _swapped:
    """functional_call as a context: the model's parameters and buffers replaced by the given tensors."""

    def __init__(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        from torch.nn.utils.stateless import _reparametrize_module

        # tie_weights: a parameter reached under two names (tied embeddings) is replaced under both
        self._ctx = _reparametrize_module(model, tensors, tie_weights=True)

    def __enter__(self) -> None:
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
