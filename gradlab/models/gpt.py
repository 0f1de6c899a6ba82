"""A small nanoGPT-style causal transformer for character-level language modelling.

token + learned position embeddings -> ``n_layer`` pre-LayerNorm blocks
(x + attn(ln_1(x)), then x + mlp(ln_2(x))) -> final LayerNorm -> linear head giving logits (B, T, vocab_size).

The attention is written out with plain ``nn.Linear`` query/key/value/output projections and an explicit masked
softmax, not ``F.scaled_dot_product_attention``: gradlab needs double backward (Hessian-vector products) and
``torch.func.vmap`` over per-example gradients, which fused attention kernels do not all support.  Every parameter
lives in an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm``.  The causal mask is a non-persistent buffer, so the
state_dict holds parameters only.

After Karpathy's nanoGPT (``model.py``) and minGPT; initialisation as in GPT-2 (Radford et al. 2019): weights
N(0, 0.02²), biases zero, residual output projections N(0, (0.02/√(2·n_layer))²).  Construction draws from torch's
global generator, as every zoo model does (``gradlab train`` builds models under ``torch.random.fork_rng`` with the
run's seed).

>>> import torch
>>> net = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
>>> net(torch.zeros(3, 8, dtype=torch.long)).shape
torch.Size([3, 8, 11])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradlab.errors import UsageError


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`.  ``tie_weights`` shares the head's weight with the token embedding.

    The defaults (2 layers, 4 heads, width 64: 114k parameters with shakespeare-char's 76 characters and block 64)
    train one epoch of shakespeare-char (8,631 windows of 64) in about a minute on one CPU thread; nanoGPT's
    character-level Shakespeare model is 6 layers, 6 heads, width 384.
    """

    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"gpt needs {name} to be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UsageError(f"gpt needs n_embd divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}; "
                             "pick n_embd as a multiple of n_head")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UsageError(f"gpt needs 0 <= dropout < 1, got {self.dropout!r}")


def _dropout(p: float) -> nn.Module:
    # no Dropout module at all when p == 0, so torch.func.vmap needs no randomness setting
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions ≤ t.

    With head size d = n_embd / n_head: softmax(q kᵀ / √d + M) v per head, M = −∞ above the diagonal.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_drop = _dropout(cfg.dropout)
        self.resid_drop = _dropout(cfg.dropout)
        causal = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.n_head
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)  # (B, h, T, d)
        k = self.k(x).view(b, t, h, c // h).transpose(1, 2)
        v = self.v(x).view(b, t, h, c // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // h))  # (B, h, T, T)
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        y = (self.attn_drop(att) @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Linear(n_embd → 4·n_embd) → GELU → Linear(4·n_embd → n_embd)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = _dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B, T) int64, T ≤ block_size → next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = _dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_weights:
            self.head.weight = self.wte.weight

    def _init_weights(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    std = resid_std if name.endswith(("attn.proj", "mlp.proj")) else 0.02
                    module.weight.normal_(0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.is_floating_point() or idx.is_complex() or idx.dim() != 2:
            raise UsageError(f"gpt takes token ids of shape (B, T) and an integer dtype, got {tuple(idx.shape)} "
                             f"{idx.dtype}; pass int64 token ids")
        b, t = idx.shape
        if t > self.config.block_size:
            raise UsageError(f"gpt got sequences of {t} tokens but its block_size is {self.config.block_size}; "
                             f"build it with block_size >= {t} or pass shorter windows")
        # position ids with the batch dimension, (B, T): the same sums as (T,) broadcast over the batch, and hooks
        # that split gradients into examples (gradlab.monitor, the probe's Gram engine) see one row per example
        pos = torch.arange(t, device=idx.device).expand(b, t)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_gpt(input_shape: Sequence[int], n_classes: int, **kwargs: object) -> GPT:
    """The zoo's ``gpt``: ``vocab_size`` defaults to ``n_classes`` and ``block_size`` to the sequence length T of
    token inputs shaped (T,); other keyword arguments are :class:`GPTConfig` fields."""
    shape = tuple(int(s) for s in input_shape)
    if "block_size" not in kwargs:
        if len(shape) != 1:
            raise UsageError(f"gpt needs token inputs of shape (N, T), got examples of shape {shape}; use a text "
                             "dataset such as shakespeare-char, or pass block_size")
        kwargs["block_size"] = shape[0]
    elif len(shape) == 1 and shape[0] > int(kwargs["block_size"]):  # type: ignore[call-overload]
        raise UsageError(f"gpt block_size={kwargs['block_size']} is shorter than the data's sequences of {shape[0]} "
                         f"tokens; pass block_size >= {shape[0]}")
    kwargs.setdefault("vocab_size", int(n_classes))
    return GPT(GPTConfig(**kwargs))  # type: ignore[arg-type]
