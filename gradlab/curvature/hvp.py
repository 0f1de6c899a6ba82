"""The training loss over a fixed sample, its gradient and exact Hessian-vector products (double backward).

For a sample of N examples, parameters θ (every parameter with ``requires_grad``, flattened in
``named_parameters`` order) and a per-example loss ℓ,

    L(θ) = (1/N) Σᵢ ℓ(f(xᵢ; θ), yᵢ),      H v = ∇_θ (∇_θ L(θ) · v)      (Pearlmutter 1994),

computed by double backward chunk by chunk: ``H v = Σ_chunks ∇(∇L_chunk · v)`` with ``L_chunk`` the chunk's
share ``(1/N) Σ_{i∈chunk} ℓᵢ``, so memory is bounded by one chunk whatever N is, and the result does not depend
on the chunking (up to rounding).

The objective works on a *functional copy* of the model (``copy.deepcopy`` cast to the requested dtype and
device, evaluated with ``torch.func.functional_call`` on a flat parameter vector): the caller's model -- its
parameters, buffers, ``.grad`` and train/eval flags -- is never touched.  Batch norm runs in eval mode (running
statistics) unless ``bn_mode="train"``; then only the batch-norm modules use batch statistics, computed per chunk
(so the BN batch is ``chunk_size``, recorded by the caller), and dropout stays off either way so that H is a
fixed matrix.

Example (mean-MSE linear regression, H = 2XᵀX/n)::

    >>> import torch
    >>> x = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> obj = SampleObjective(torch.nn.Linear(3, 1, bias=False), x, y, loss="mse")
    >>> v = torch.randn(3, dtype=torch.float64)
    >>> bool(torch.allclose(obj.hvp(v), 2 * x.T @ x @ v / 20))
    True
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from gradlab.errors import UsageError
from gradlab.task import LOSSES as TASK_LOSSES
from gradlab.task import Batch, PerExampleLoss, batch_len, index_batch, loss_name, resolve_loss, to_run

log = logging.getLogger(__name__)

BN_MODES = ("eval", "train")


class NotTwiceDifferentiable(UsageError):
    """The loss has no usable second derivative (double backward fails, or H v ≡ 0 while ∇L ≠ 0)."""


class NonFiniteCurvature(UsageError):
    """A loss, gradient or Hessian-vector product came out NaN or infinite."""


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example squared error averaged over output entries (so the mean over examples is ``nn.MSELoss``)."""
    diff = out - y.reshape(out.shape).to(out.dtype)
    return diff.pow(2).flatten(1).mean(1) if diff.dim() > 1 else diff.pow(2)


# Per-example losses: (outputs, targets) -> (n,) tensor.  An explicit registry.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
}


def objective_loss(loss: str | PerExampleLoss) -> PerExampleLoss:
    """A per-example loss ``fn(model, batch) -> (B,)`` (:mod:`gradlab.task`) from a name of ``LOSSES`` (on (x, y)
    batches, as before the task contract), a task loss name (``cross-entropy``, ``lm``) or a callable."""
    if callable(loss):
        return loss
    if loss in LOSSES:
        fn = LOSSES[loss]
        return lambda model, batch: fn(model(batch[0]), batch[1])
    try:
        return resolve_loss(loss)
    except UsageError:
        raise UsageError(f"unknown loss {loss!r}; choose one of {sorted({*LOSSES, *TASK_LOSSES})} or pass "
                         "pkg.module:fn") from None


class _SummedLoss(nn.Module):
    """Σᵢ ℓᵢ over a batch as a module, so ``functional_call`` can swap the parameters of ``model``."""

    def __init__(self, model: nn.Module, loss: PerExampleLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(self.model, batch).sum()


def _is_batch_norm(module: nn.Module) -> bool:
    from gradlab.models.norm import GhostBatchNorm

    return isinstance(module, (nn.modules.batchnorm._BatchNorm, GhostBatchNorm))


def functional_copy(model: nn.Module, *, dtype: torch.dtype, device: torch.device | str, bn_mode: str) -> nn.Module:
    """A deep copy of ``model`` in ``dtype`` on ``device``, in eval mode except batch norm when ``bn_mode="train"``.

    The copy shares nothing with ``model``; gradients are never accumulated into it (we only call
    ``torch.autograd.grad`` on a separate flat parameter vector).
    """
    if bn_mode not in BN_MODES:
        raise UsageError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    net = copy.deepcopy(model).to(device=device, dtype=dtype)
    net.eval()
    if bn_mode == "train":
        for m in net.modules():
            if _is_batch_norm(m):
                m.train()
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    return net


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` contains a batch-norm module (the ``bn_mode`` choice matters only then)."""
    return any(_is_batch_norm(m) for m in model.modules())


class SampleObjective:
    """L(θ) = (1/N) Σᵢ ℓ(f(xᵢ; θ), yᵢ) over a fixed sample, with ∇L and exact H v by double backward.

    ``theta0`` is the checkpoint's flat parameter vector; every method takes an optional flat ``theta`` (default
    ``theta0``).  ``hvp_count`` counts Hessian-vector products (one per ``hvp`` call, whatever the chunking).

    ``cache_graph``: keep the graph of ∇L(θ₀) (built with ``create_graph``) between calls, so that each H v at θ₀
    is one backward pass through it instead of forward + backward + double backward -- 1.5× faster on the digits
    MLP (1.1 M parameters, 512 examples), the trick PyHessian uses.  It holds every chunk's double-backward graph at once, so ``"auto"`` (default) caches
    only when one chunk covers the sample (then the memory peak is that of a single uncached HVP); ``True``
    caches always, ``False`` never.  Results are bitwise the same either way (the same operations run).
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor | Batch,
        y: torch.Tensor | None = None,
        *,
        loss: str | PerExampleLoss = "cross_entropy",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        chunk_size: int = 256,
        bn_mode: str = "eval",
        cache_graph: bool | str = "auto",
    ) -> None:
        per_example = objective_loss(loss)
        if chunk_size < 1:
            raise UsageError(f"chunk_size must be >= 1, got {chunk_size}")
        batch = x if y is None else (x, y)
        if y is not None and (x.shape[0] == 0 or x.shape[0] != y.shape[0]):
            raise UsageError(f"need a non-empty sample with as many labels as inputs, got x {tuple(x.shape)} and "
                             f"y {tuple(y.shape)}")
        self.loss_name = loss_name(loss) if not isinstance(loss, str) else loss
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self.bn_mode = bn_mode
        self.net = functional_copy(model, dtype=dtype, device=self.device, bn_mode=bn_mode)
        self._summed = _SummedLoss(self.net, per_example)
        self.batch = to_run(batch, device=self.device, dtype=dtype)
        self.n_examples = batch_len(self.batch)
        if self.n_examples == 0:
            raise UsageError("need a non-empty sample")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UsageError("the model has no trainable parameters (none with requires_grad); nothing to measure")
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        self.param_sizes = [int(p.numel()) for _, p in named]
        self.n_params = int(sum(self.param_sizes))
        own = dict(self.net.named_parameters())
        self.theta0 = torch.cat([own[n].detach().reshape(-1) for n in self.param_names]).clone()
        self._fixed = {n: t for n, t in self.net.named_parameters() if n not in set(self.param_names)}
        self._buffers = dict(self.net.named_buffers())
        self.hvp_count = 0
        if cache_graph not in (True, False, "auto"):
            raise UsageError(f"cache_graph must be True, False or 'auto', got {cache_graph!r}")
        self.cache_graph = bool(cache_graph) if cache_graph != "auto" else self.n_examples <= self.chunk_size
        self._graph: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _as_theta(self, theta: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        if theta is None:
            return self.theta0
        t = torch.as_tensor(theta).to(device=self.device, dtype=self.dtype).reshape(-1)
        if t.numel() != self.n_params:
            raise ValueError(f"theta has {t.numel()} entries, the model has {self.n_params} parameters")
        return t

    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's tensors (named as in ``_SummedLoss``: ``model.<name>``) with the parameters taken from
        ``flat``."""
        pieces = torch.split(flat, self.param_sizes)
        out = {n: p.view(s) for n, p, s in zip(self.param_names, pieces, self.param_shapes)}
        out.update(self._fixed)
        out.update(self._buffers)
        return {f"model.{n}": t for n, t in out.items()}

    def _chunks(self) -> range:
        return range(0, self.n_examples, self.chunk_size)

    def _chunk_loss(self, flat: torch.Tensor, i0: int) -> torch.Tensor:
        """This chunk's share of L: (1/N) Σ_{i in chunk} ℓᵢ."""
        i1 = min(i0 + self.chunk_size, self.n_examples)
        return functional_call(self._summed, self._params(flat), (index_batch(self.batch, slice(i0, i1)),)) \
            / self.n_examples

    # -- public -----------------------------------------------------------------------------------------------
    def value(self, theta: torch.Tensor | np.ndarray | None = None) -> float:
        """L(θ) over the sample."""
        flat = self._as_theta(theta)
        with torch.no_grad():
            total = sum(float(self._chunk_loss(flat, i0)) for i0 in self._chunks())
        return float(total)

    def value_and_grad(self, theta: torch.Tensor | np.ndarray | None = None) -> tuple[float, torch.Tensor]:
        """(L(θ), ∇L(θ)) over the sample, accumulated chunk by chunk."""
        flat = self._as_theta(theta).detach().requires_grad_(True)
        total, grad = 0.0, torch.zeros_like(flat)
        for i0 in self._chunks():
            loss = self._chunk_loss(flat, i0)
            (g,) = torch.autograd.grad(loss, flat)
            total += float(loss.detach())
            grad += g
        return total, grad.detach()

    def hvp(self, v: torch.Tensor | np.ndarray, theta: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """H(θ) v = ∇(∇L(θ)·v), by double backward per chunk (Pearlmutter 1994).

        Raises :class:`NotTwiceDifferentiable` when double backward fails.  A gradient that does not depend on θ
        (its graph was cut, e.g. by a custom autograd Function) gives H v = 0; :func:`check_twice_differentiable`
        turns that into an error when ∇L ≠ 0.
        """
        vec = torch.as_tensor(v).to(device=self.device, dtype=self.dtype).reshape(-1)
        if vec.numel() != self.n_params:
            raise ValueError(f"v has {vec.numel()} entries, the model has {self.n_params} parameters")
        cached = self.cache_graph and theta is None
        if cached and self._graph is None:
            flat0 = self.theta0.detach().requires_grad_(True)
            self._graph = (flat0, [self._chunk_grad(flat0, i0) for i0 in self._chunks()])
        flat = self._graph[0] if cached else self._as_theta(theta).detach().requires_grad_(True)  # type: ignore[index]
        out = torch.zeros_like(flat)
        self.hvp_count += 1
        for c, i0 in enumerate(self._chunks()):
            g = self._graph[1][c] if cached else self._chunk_grad(flat, i0)  # type: ignore[index]
            if not g.requires_grad:
                continue  # the gradient is constant in θ along every path autograd can see
            try:
                (hv,) = torch.autograd.grad(g @ vec, flat, allow_unused=True, retain_graph=cached)
            except RuntimeError as exc:
                raise _not_twice(exc) from None
            if hv is not None:
                out += hv
        return out.detach()

    def _chunk_grad(self, flat: torch.Tensor, i0: int) -> torch.Tensor:
        """∇L_chunk with its graph kept (create_graph) for a second backward."""
        loss = self._chunk_loss(flat, i0)
        try:
            (g,) = torch.autograd.grad(loss, flat, create_graph=True)
        except RuntimeError as exc:
            raise _not_twice(exc) from None
        return g


def _not_twice(exc: RuntimeError) -> NotTwiceDifferentiable:
    first = str(exc).splitlines()[0]
    fix = ("Hessian-based sharpness needs a model whose operations support double backward (custom autograd "
           "Functions must not be @once_differentiable).")
    if "scaled_dot_product" in first or "attention" in first:
        fix = ("Fused attention kernels (F.scaled_dot_product_attention) have no double backward: build the model "
               "with eager attention (Hugging Face: attn_implementation=\"eager\" in the factory; your own code: "
               "softmax(q kᵀ/√d) v with matmuls).")
    return NotTwiceDifferentiable(
        f"the loss is not twice differentiable: double backward through the model failed ({first}). {fix}")


def check_twice_differentiable(obj: SampleObjective, rng: np.random.Generator, n_probes: int = 2) -> None:
    """Refuse a loss without a usable Hessian, and a non-finite loss, gradient or curvature.

    Raises :class:`NonFiniteCurvature` when L, ∇L or H v is NaN/inf, and :class:`NotTwiceDifferentiable` when
    double backward fails or when H v ≡ 0 on ``n_probes`` random Rademacher vectors while ∇L ≠ 0.  The latter is
    the signature of a gradient whose graph is cut from θ (a custom autograd Function returning detached or
    ``@once_differentiable`` gradients, ``.detach()`` inside the model, piecewise-constant operations): autograd
    then sees no second derivative at all and every Hessian-based sharpness would silently be 0.
    """
    value, grad = obj.value_and_grad()
    if not np.isfinite(value) or not bool(torch.isfinite(grad).all()):
        raise NonFiniteCurvature(f"the loss ({value}) or its gradient is not finite at this checkpoint; curvature "
                                 "is undefined there. Check the checkpoint (diverged run?) and --dtype.")
    all_zero = True
    for _ in range(n_probes):
        v = torch.from_numpy(rng.integers(0, 2, size=obj.n_params).astype(np.float64) * 2 - 1)
        hv = obj.hvp(v)
        if not bool(torch.isfinite(hv).all()):
            raise NonFiniteCurvature("a Hessian-vector product is not finite at this checkpoint (non-finite "
                                     "curvature); check the checkpoint or use --dtype float64")
        all_zero &= bool((hv == 0).all())
    if all_zero and bool((grad != 0).any()):
        raise NotTwiceDifferentiable(
            "the loss is not twice differentiable as far as autograd can tell: Hessian-vector products are "
            f"identically zero on {n_probes} random vectors while the gradient is non-zero (norm "
            f"{float(grad.norm()):.3g}). The model's backward pass is probably cut from the parameters (a custom "
            "autograd Function, .detach(), or a piecewise-constant operation); Hessian sharpness is undefined for it."
        )
