"""A tiny decoder-only transformer whose FFN slot takes any module.

The model is GPT-2 shaped (pre-norm blocks, learned positions, tied input and output embeddings) and small
enough to train on a laptop CPU in a minute. Each block's FFN comes from ``ffn_factory(layer_index)``: a
dense :class:`~moe_ref.ffn.FFN` by default, an MoE layer in later chapters. The model never looks inside the
FFN; the training loop collects whatever auxiliary losses it leaves behind (see :mod:`moe_ref.book.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..counting import attention_flops, count_params
from ..ffn import FFN


@dataclass
class ModelConfig:
    """Sizes of :class:`TinyTransformer`.

    Attributes:
        vocab_size: number of token ids (256 for bytes).
        block_size: longest context, in tokens.
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: attention heads; must divide ``d_model``.
        d_hidden: hidden width of the default dense FFN.
        activation: activation of the default dense FFN.
        dropout: dropout probability on attention and residual branches.
    """

    vocab_size: int = 256
    block_size: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_hidden: int = 512
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "d_hidden"):
            _checks.positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model={self.d_model}, got n_heads={self.n_heads}")
        _checks.finite_float("dropout", self.dropout, minimum=0.0)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be < 1, got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``[B, T, d_model] -> [B, T, d_model]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + ffn(ln(x))``."""

    def __init__(self, config: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class TinyTransformer(nn.Module):
    """Decoder-only language model: token ids ``[B, T]`` -> logits ``[B, T, vocab_size]``.

    Args:
        config: the sizes.
        ffn_factory: ``ffn_factory(layer_index) -> nn.Module`` mapping ``[..., d_model]`` to the same shape.
            Defaults to ``FFN(d_model, d_hidden, activation)``.
    """

    def __init__(self, config: ModelConfig, ffn_factory: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        if ffn_factory is None:
            def ffn_factory(_layer: int) -> nn.Module:
                return FFN(config.d_model, config.d_hidden, config.activation)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, ffn_factory(i)) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by 1/sqrt(2 * n_layers):
        # attention's output projection and every FFN's or expert's output matrix (FFN.w_out.weight,
        # Experts.w_out). Parameters that are not nn.Linear / nn.Embedding weights keep their own init (the
        # noisy router's zero noise weights, for one).
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "w_out.weight", ".w_out")):
                nn.init.normal_(p, std=0.02 / (2 * config.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def ffns(self) -> list:
        """The FFN-slot module of every block, in order."""
        return [block.ffn for block in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``idx``: ``[B, T]`` int64 token ids with ``T <= block_size``; ``targets``: same shape, or ``None``.

        Returns:
            ``(logits, loss)``: logits ``[B, T, vocab_size]``; the mean cross-entropy against ``targets``
            (a scalar tensor), or ``None`` when no targets are given.
        """
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must be an int64 or int32 tensor, got {getattr(idx, 'dtype', type(idx))}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [batch, time], got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"idx has {T} positions, more than block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count; with ``exclude_embeddings``, without the (tied) token and position embeddings."""
        n = count_params(self)
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward matmul FLOPs per token at ``context`` (default ``block_size``).

        Attention from :func:`~moe_ref.counting.attention_flops`, each FFN slot from its own
        ``flops_per_token()`` (a sparse layer counts only its active experts), and ``2 * d_model * vocab``
        for the output head. Embedding look-ups cost no FLOPs.
        """
        c = self.config
        context = c.block_size if context is None else _checks.positive_int("context", context)
        total = 2 * c.d_model * c.vocab_size
        for ffn in self.ffns:
            if not hasattr(ffn, "flops_per_token"):
                raise TypeError(f"FFN module {type(ffn).__name__} has no flops_per_token() method")
            total += attention_flops(c.d_model, context) + ffn.flops_per_token()
        return total
