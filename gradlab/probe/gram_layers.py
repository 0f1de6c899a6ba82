"""Per-layer exact Gram matrices Kᵢⱼ = gᵢ·gⱼ from a layer's inputs and output gradients (no per-example autograd).

Each class below handles one layer family.  The engine (``gradlab.probe.gram``) hooks the layer, hands it its
input ``x`` and the gradient ``δ = ∂(Σᵢ ℓᵢ)/∂output`` chunk by chunk (:meth:`LayerGram.collect`; row i of δ is
example i's own), then asks for the Grams and summed gradients of the N examples (:meth:`LayerGram.finish`).

Linear maps over positions (``nn.Linear`` on (B, T…, d), ``nn.Conv1d/2d`` through their unfolded patches, with
G ≥ 1 groups): gᵢ = Σ_t δ_it a_itᵀ (a_it: the input, or patch, at position t), so two exact forms exist:

- *ghost*: Kᵢⱼ = Σ_g Σ_{t,s} (a_itg·a_jsg)(δ_itg·δ_jsg): per pair of examples G·T²·(d_in + d_out) multiply-adds,
  memory bounded by row blocks of (b·T) × (N·T) products, independent of d_in·d_out;
- *materialise*: Γ_i = Σ_t δ_it ⊗ a_it (N × G·d_in·d_out, one batched product), K = Γ Γᵀ: G·d_in·d_out per pair.

A layer takes the ghost form when T²·(d_in + d_out) < d_in·d_out (Li et al. 2021's "ghost clipping" trade-off,
docs/science.md), or when Γ would exceed the fallback memory budget; T = 1 (a Linear on (B, d)) is the classic
K = (A Aᵀ) ∘ (D Dᵀ).  Biases: Γ_i = Σ_t δ_it, always materialised (N × d_out).

Embedding (ids (B, T…), weight (V, d)): gᵢ adds δ_it to row id_it, i.e. gᵢ = Σ_t e_{id_it} δ_itᵀ: the same two
forms with a_it·a_js replaced by [id_it = id_js] -- ghost T²·(d + 1) per pair against materialised V·d.  Positions
holding ``padding_idx`` get no gradient (their δ is zeroed).

Norm layers (LayerNorm, RMSNorm, BatchNorm in eval mode with running statistics, GroupNorm): with x̂ the
normalised input, weight Γ_i = Σ_positions δ_i ∘ x̂_i and bias Γ_i = Σ_positions δ_i, both of the parameter's size:
always materialised, K = Γ Γᵀ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GHOST_BLOCK_BYTES = 64 * 2**20  # memory of one row block of the ghost products
SYM_BLOCK = 256  # below this many rows a Gram matrix is one GEMM


def sym_gram(x: Tensor, block: int = SYM_BLOCK) -> Tensor:
    """X Xᵀ for X (N, d), computing only the blocks on and below the diagonal (recursively halved down to ``block``
    rows) and mirroring the rest: about 5/8 of the GEMM work for N = 1024."""
    n = x.shape[0]
    if n <= block:
        return x @ x.T
    h = n // 2
    out = x.new_empty(n, n)
    out[:h, :h] = sym_gram(x[:h], block)
    out[h:, h:] = sym_gram(x[h:], block)
    torch.mm(x[h:], x[:h].T, out=out[h:, :h])
    out[:h, h:] = out[h:, :h].T
    return out


def ghost_gram(sim: "callable", d: Tensor) -> Tensor:
    """Kᵢⱼ = Σ_g Σ_{t,s} S_g[it, js] (δ_itg·δ_jsg) for δ (N, T, G, d_out), with ``sim(rows, g)`` giving the
    (len(rows)·T, N·T) similarity block S_g of examples ``rows`` (a·a for linear maps, [id = id] for embeddings)."""
    n, t, groups, _ = d.shape
    k = d.new_zeros(n, n)
    rows = max(1, GHOST_BLOCK_BYTES // (3 * n * t * t * d.element_size()))
    for g in range(groups):
        dg = d[:, :, g].reshape(n * t, -1)
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            m = sim(slice(i0, i1), g) * (dg[i0 * t:i1 * t] @ dg.T)
            k[i0:i1] += m.reshape(i1 - i0, t, n, t).sum((1, 3))
    return k


def _name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


class LayerGram:
    """Base of the per-family handlers: the selected parameter names of one module, chunks collected per call."""

    def __init__(self, module: nn.Module, module_name: str, selected: set[str],
                 canonical: dict[int, str] | None = None) -> None:
        self.module = module
        names = {a: (canonical or {}).get(id(p), _name(module_name, a))
                 for a, p in module.named_parameters(recurse=False)}
        self.names = {a: n for a, n in names.items() if n in selected}
        self.mode = "materialise"
        self.budget = 2 * 2**30
        self.broadcast = False  # an Embedding on ids without the batch dimension (positions), set by the engine
        self.tied: dict[str, dict[str, Any]] = {}  # attr -> store shared with the other user of a tied tensor

    @staticmethod
    def accepts(module: nn.Module, x: Tensor, out: Tensor) -> bool:
        return True

    def begin(self, n: int, budget: int) -> None:
        self.n, self.budget, self.parts = n, budget, {}
        for store in self.tied.values():
            store.clear()

    def _slot(self, key: str, like: Tensor, rows: int, shape: tuple[int, ...], zero: bool = False) -> Tensor:
        """The next ``rows`` rows of the (N, *shape) buffer ``key`` (allocated once per call: no concatenation).
        A tied tensor's buffer is shared by its users, zeroed, and each adds its per-example gradients into it."""
        store = self.tied.get(key)
        if store is not None:
            if "buf" not in store:
                store["buf"] = like.new_zeros((self.n, *shape))
            filled = store.setdefault(id(self), 0)
            store[id(self)] = filled + rows
            return store["buf"][filled:filled + rows]
        if key not in self.parts:
            self.parts[key] = [like.new_zeros((self.n, *shape)) if zero else like.new_empty((self.n, *shape)), 0]
        buf, filled = self.parts[key]
        self.parts[key][1] = filled + rows
        return buf[filled:filled + rows]

    def _add(self, key: str, value: Tensor) -> None:
        self._slot(key, value, value.shape[0], tuple(value.shape[1:])).copy_(value)

    def _cat(self, key: str) -> Tensor:
        return self.parts.pop(key)[0]

    def _gamma(self, attr: str, gram: dict[str, Tensor], grad_sum: dict[str, Tensor], want_sum: bool) -> None:
        """K = Γ Γᵀ and Σᵢ Γ_i for a materialised parameter ``attr`` (a tied one by whichever user finishes first)."""
        if attr in self.tied and "buf" in self.tied[attr]:
            self.parts[attr] = [self.tied[attr].pop("buf"), self.n]
        if attr in self.parts:
            g = self._cat(attr)
            gram[self.names[attr]] = sym_gram(g).double()
            if want_sum:
                grad_sum[self.names[attr]] = g.sum(0).reshape(getattr(self.module, attr).shape)

    def collect(self, x: Tensor, delta: Tensor) -> None:
        raise NotImplementedError

    def finish(self, gram: dict[str, Tensor], grad_sum: dict[str, Tensor], want_sum: bool) -> None:
        raise NotImplementedError


class PositionsGram(LayerGram):
    """Linear maps over positions: ``nn.Linear`` on (B, T…, d_in), ``nn.Conv1d/2d`` on unfolded patches."""

    def _positions(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """(a (B, T, G, d_in), δ (B, T, G, d_out))."""
        return x.reshape(x.shape[0], -1, 1, x.shape[-1]), delta.reshape(delta.shape[0], -1, 1, delta.shape[-1])

    def _choose(self, a: Tensor, d: Tensor) -> None:
        _, t, groups, d_in = a.shape
        d_out = d.shape[-1]
        fits = self.n * groups * d_in * d_out * a.element_size() <= self.budget
        self.mode = "ghost" if ("weight" in self.names and not self.tied
                                and (t * t * (d_in + d_out) < d_in * d_out or not fits)) else "materialise"

    def collect(self, x: Tensor, delta: Tensor) -> None:
        a, d = self._positions(x, delta)
        if not self.parts:
            self._choose(a, d)
        if "bias" in self.names:
            self._add("bias", d.sum(1).reshape(d.shape[0], -1))
        if "weight" in self.names:
            if self.mode == "ghost":
                self._add("a", a)
                self._add("d", d)
            else:
                b, _, groups, d_in = a.shape
                rows = self._slot("weight", a, b, (groups * d.shape[-1] * d_in,))
                if groups == 1 and self.tied:  # Γ_i += D_iᵀ A_i (the other use of the tensor adds its own)
                    rows.view(b, d.shape[-1], d_in).baddbmm_(d[:, :, 0].transpose(1, 2), a[:, :, 0])
                elif groups == 1:  # Γ_i = D_iᵀ A_i, written in place
                    torch.bmm(d[:, :, 0].transpose(1, 2), a[:, :, 0], out=rows.view(b, d.shape[-1], d_in))
                else:
                    rows.copy_(torch.einsum("ntgo,ntgi->ngoi", d, a).reshape(b, -1))

    def finish(self, gram: dict[str, Tensor], grad_sum: dict[str, Tensor], want_sum: bool) -> None:
        if "weight" in self.names and self.mode == "ghost":
            a, d = self._cat("a"), self._cat("d")
            w = self.names["weight"]
            if a.shape[1] == 1 and a.shape[2] == 1:  # one position: K = (A Aᵀ) ∘ (D Dᵀ)
                a2, d2 = a[:, 0, 0], d[:, 0, 0]
                dd = sym_gram(d2)
                gram[w] = (sym_gram(a2) * dd).double()
                if "bias" in self.names:  # Γ_b = D: reuse D Dᵀ
                    self.parts.pop("bias")
                    gram[self.names["bias"]] = dd.double()
                    if want_sum:
                        grad_sum[self.names["bias"]] = d2.sum(0)
            else:
                n, t = a.shape[:2]

                def sim(rows: slice, g: int) -> Tensor:
                    ag = a[:, :, g].reshape(n * t, -1)
                    return ag[rows.start * t:rows.stop * t] @ ag.T

                gram[w] = ghost_gram(sim, d).double()
            if want_sum:
                grad_sum[w] = torch.einsum("ntgo,ntgi->goi", d, a).reshape(self.module.weight.shape)
        self._gamma("weight", gram, grad_sum, want_sum)
        self._gamma("bias", gram, grad_sum, want_sum)


class LinearGram(PositionsGram):
    @staticmethod
    def accepts(module: nn.Module, x: Tensor, out: Tensor) -> bool:
        return x.dim() >= 2


class ConvGram(PositionsGram):
    """``nn.Conv1d``/``nn.Conv2d`` (any groups, stride, dilation, padding and padding mode) via ``F.unfold``."""

    @staticmethod
    def accepts(module: nn.Module, x: Tensor, out: Tensor) -> bool:
        dims = 1 if isinstance(module, nn.Conv1d) else 2
        return x.dim() == dims + 2 and out.dim() == dims + 2

    def _positions(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        m = self.module
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        if x.dim() == 3:  # Conv1d as a 1 × L image
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C_in·k, L)
        b, groups = x.shape[0], m.groups
        a = patches.reshape(b, groups, -1, patches.shape[-1]).permute(0, 3, 1, 2)  # (B, L, G, C_in/G·k)
        d = delta.reshape(b, groups, delta.shape[1] // groups, -1).permute(0, 3, 1, 2)  # (B, L, G, C_out/G)
        return a, d


class EmbeddingGram(LayerGram):
    """``nn.Embedding`` (not ``scale_grad_by_freq``, whose gradient mixes the examples of a batch)."""

    @staticmethod
    def accepts(module: nn.Module, x: Tensor, out: Tensor) -> bool:
        return not module.scale_grad_by_freq and not x.is_floating_point() and x.dim() >= 1

    def _choose(self, t: int, vocab: int, dim: int, itemsize: int) -> None:
        fits = self.n * vocab * dim * itemsize <= self.budget
        self.mode = "ghost" if not self.tied and (t * t * (dim + 1) < vocab * dim or not fits) else "materialise"

    def collect(self, x: Tensor, delta: Tensor) -> None:
        if "weight" not in self.names:
            return
        b = delta.shape[0]
        ids = x.reshape(1, -1).expand(b, -1) if self.broadcast else x.reshape(b, -1)
        d = delta.reshape(b, ids.shape[1], -1)
        if self.module.padding_idx is not None:
            d = d.masked_fill((ids == self.module.padding_idx)[..., None], 0)
        vocab, dim = self.module.weight.shape
        if not self.parts:
            self._choose(ids.shape[1], vocab, dim, d.element_size())
        if self.mode == "ghost":
            self._add("ids", ids)
            self._add("d", d)
        else:
            rows = self._slot("weight", d, b, (vocab * dim,), zero=True)
            rows.view(b, vocab, dim).scatter_add_(1, ids[..., None].expand(-1, -1, dim), d)

    def finish(self, gram: dict[str, Tensor], grad_sum: dict[str, Tensor], want_sum: bool) -> None:
        if "weight" in self.names and self.mode == "ghost":
            ids, d = self._cat("ids"), self._cat("d")
            n, t = ids.shape
            flat = ids.reshape(-1)

            def sim(rows: slice, g: int) -> Tensor:
                return (flat[rows.start * t:rows.stop * t, None] == flat[None]).to(d.dtype)

            gram[self.names["weight"]] = ghost_gram(sim, d[:, :, None]).double()
            if want_sum:
                grad_sum[self.names["weight"]] = d.new_zeros(self.module.weight.shape).index_add_(
                    0, flat, d.reshape(n * t, -1))
        self._gamma("weight", gram, grad_sum, want_sum)


class NormGram(LayerGram):
    """Affine weight and bias of normalisation layers: Γ_i = Σ_positions δ_i ∘ x̂_i and Σ_positions δ_i."""

    def _first(self, x: Tensor) -> int:
        """The first parameter dimension: the trailing dims for LayerNorm/RMSNorm, the channels (1) otherwise."""
        m = self.module
        return x.dim() - len(m.normalized_shape) if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) else 1

    def _normalised(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, training=False, eps=m.eps)

    @staticmethod
    def accepts(module: nn.Module, x: Tensor, out: Tensor) -> bool:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode with running statistics only
            return not module.training and module.running_mean is not None and x.dim() >= 2
        return x.dim() >= 2 and x.shape == out.shape

    def collect(self, x: Tensor, delta: Tensor) -> None:
        first = self._first(x)
        if "weight" in self.names:
            self._add("weight", self._reduce(delta * self._normalised(x), first))
        if "bias" in self.names:
            self._add("bias", self._reduce(delta, first))

    @staticmethod
    def _reduce(v: Tensor, first: int) -> Tensor:
        """Σ over the non-parameter positions: (B, p)."""
        b = v.shape[0]
        if first == 1:  # channels: (B, C, *) -> (B, C)
            return v.reshape(b, v.shape[1], -1).sum(2)
        p = 1
        for s in v.shape[first:]:
            p *= s
        return v.reshape(b, -1, p).sum(1)

    def finish(self, gram: dict[str, Tensor], grad_sum: dict[str, Tensor], want_sum: bool) -> None:
        self._gamma("weight", gram, grad_sum, want_sum)
        self._gamma("bias", gram, grad_sum, want_sum)


FAMILIES: dict[type[nn.Module], type[LayerGram]] = {
    nn.Linear: LinearGram, nn.Conv1d: ConvGram, nn.Conv2d: ConvGram, nn.Embedding: EmbeddingGram,
    nn.LayerNorm: NormGram, nn.RMSNorm: NormGram, nn.GroupNorm: NormGram,
    nn.BatchNorm1d: NormGram, nn.BatchNorm2d: NormGram,
}


def family(module: nn.Module) -> type[LayerGram] | None:
    """The handler class of a module (exact type or subclass), or None when it has no fast path."""
    for cls in type(module).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    return None
