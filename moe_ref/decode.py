"""Chapter 11: KV-cached generation for the book's :class:`~moe_ref.book.model.TinyTransformer`.

Generating one token at a time with the plain forward recomputes every earlier position at every step:
``O(T^2)`` work for ``T`` tokens. A causal model's keys and values at a position never change once that
position is computed, so they can be kept: the **KV cache**. Each step then runs the model on the new
tokens only, ``[B, t_new]``, and lets them attend to the cached keys and values of the positions before.

The functions here use the model's own modules (embeddings, norms, ``qkv`` and ``proj`` of
:class:`~moe_ref.book.model.CausalSelfAttention`, every block's FFN, the tied head) without changing the
model: :func:`forward_cached` is the model's forward with the attention rewritten to read and extend a
:class:`KVCache`. Any FFN slot works (dense or MoE), since an FFN is position-wise.

* :class:`KVCache`: per layer, keys and values ``[B, heads, block_size, d_head]``, filled to ``length``;
* :func:`forward_cached`: ``(model, idx [B, t_new], cache) -> logits [B, t_new, vocab]``, extending the cache;
* :func:`sample`: the next token from the last logits: greedy at ``temperature=0``, else softmax of
  ``logits / temperature``, optionally restricted to the ``top_k`` largest;
* :func:`generate`: prefill the prompt, then one cached step per new token.

Two helpers measure what a decode step of ``B`` sequences costs an MoE layer, whose every touched expert's
weights must be read: :func:`expected_touched_experts`, the expected number of distinct experts that ``B``
tokens hit under independent routing, and :func:`touched_experts`, the same count on recorded routing traces.

The context is limited to ``block_size`` (learned positions): generation stops with a ``ValueError`` rather
than sliding a window the model was never trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks

__all__ = ["KVCache", "forward_cached", "sample", "generate", "expected_touched_experts", "touched_experts"]


class KVCache:
    """Keys and values of every layer of a :class:`~moe_ref.book.model.TinyTransformer`, for ``batch`` sequences.

    Attributes:
        keys, values: one tensor per layer, ``[batch, n_heads, block_size, d_head]``, allocated once (no
            re-allocation per step); positions ``0 .. length - 1`` are filled.
        length: positions cached so far (the same for every layer and sequence).

    Args:
        model: the model (its ``config`` gives the sizes; its parameters the device and dtype).
        batch: number of sequences.
    """

    def __init__(self, model: nn.Module, batch: int):
        c = _model_config(model)
        self.batch = _checks.positive_int("batch", batch)
        self.block_size = c.block_size
        p = next(model.parameters())
        shape = (self.batch, c.n_heads, c.block_size, c.d_model // c.n_heads)
        self.keys = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layers)]
        self.values = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(c.n_layers)]
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of the allocated keys and values (``2 * layers * batch * block_size * d_model`` elements)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def __repr__(self) -> str:
        return f"KVCache(batch={self.batch}, length={self.length}, block_size={self.block_size})"


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "blocks"):
        raise TypeError(f"model must be a TinyTransformer (with config and blocks), got {type(model).__name__}")
    return config


def _attend(attn: nn.Module, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """:class:`~moe_ref.book.model.CausalSelfAttention` on ``x`` ``[B, t, C]`` at positions ``start ..
    start + t - 1``: write their keys and values into the cache tensors, attend to positions ``0 .. start + t - 1``.
    """
    B, t, C = x.shape
    h = attn.n_heads
    q, k, v = attn.qkv(x).split(C, dim=2)
    q, k, v = (z.view(B, t, h, C // h).transpose(1, 2) for z in (q, k, v))  # [B, h, t, C / h]
    end = start + t
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    if t == 1:  # one new query sees every cached position: no mask
        y = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])
    else:
        # query i (absolute position start + i) sees positions <= start + i: a causal mask shifted by start
        mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(B, t, C))


@torch.no_grad()
def forward_cached(model: nn.Module, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The model's forward on new tokens ``idx`` ``[B, t_new]`` (int64), after the ``cache.length`` cached ones.

    Computes exactly what ``model(full_sequence)[0][:, cache.length:]`` computes (up to float rounding),
    in eval mode (no dropout), without gradients. Extends ``cache`` by ``t_new`` positions.

    Returns:
        logits ``[B, t_new, vocab_size]`` in the model's dtype.

    Raises:
        ValueError: if ``idx`` is not ``[cache.batch, t_new]`` with ``t_new >= 1``, or if the cached and new
            positions together exceed ``block_size``.
    """
    c = _model_config(model)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an int64 or int32 tensor, got {getattr(idx, 'dtype', type(idx))}")
    if idx.dim() != 2 or idx.shape[0] != cache.batch or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape [batch={cache.batch}, t_new >= 1], got {tuple(idx.shape)}")
    start, t = cache.length, idx.shape[1]
    if start + t > c.block_size:
        raise ValueError(f"idx: {start} cached + {t} new positions exceed block_size={c.block_size}")
    if model.training:
        raise ValueError("model must be in eval mode (model.eval()): generation runs without dropout")
    pos = torch.arange(start, start + t, device=idx.device)
    x = model.tok_emb(idx) + model.pos_emb(pos)
    for i, block in enumerate(model.blocks):
        x = x + _attend(block.attn, block.ln1(x), cache.keys[i], cache.values[i], start)
        x = x + block.ffn(block.ln2(x))
    cache.length = start + t
    return model.head(model.ln_f(x))


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``logits`` ``[B, vocab]``: ``[B, 1]`` int64.

    ``temperature == 0`` is greedy (the arg-max, ties to the lowest id). Otherwise the distribution is
    ``softmax(logits / temperature)``, restricted to the ``top_k`` largest logits when ``top_k`` is given
    (ties at the ``k``-th value are all kept).
    """
    temperature = _checks.finite_float("temperature", temperature, minimum=0.0)
    if top_k is not None:
        top_k = _checks.positive_int("top_k", top_k)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [batch, vocab] tensor, got {getattr(logits, 'shape', type(logits))}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt`` ``[B, T0]`` (int64) by ``max_new_tokens`` tokens with a KV cache.

    One prefill call on the prompt, then one :func:`forward_cached` call per new token on ``[B, 1]``.
    Sampling as in :func:`sample` (greedy at ``temperature=0``). The model is put in eval mode for the
    call and its mode restored after.

    Returns:
        ``[B, T0 + max_new_tokens]`` int64: the prompt followed by the new tokens.

    Raises:
        ValueError: an empty prompt or one longer than ``block_size``; ``T0 + max_new_tokens > block_size``
            (the model has no positions beyond it); ``temperature < 0``; ``top_k < 1``.
    """
    c = _model_config(model)
    temperature = _checks.finite_float("temperature", temperature, minimum=0.0)
    if top_k is not None:
        top_k = _checks.positive_int("top_k", top_k)
    max_new_tokens = _checks.positive_int("max_new_tokens", max_new_tokens, minimum=0)
    if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt must be an int64 or int32 tensor, got {getattr(prompt, 'dtype', type(prompt))}")
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape [batch, T0 >= 1], got {tuple(prompt.shape)}")
    if prompt.shape[1] > c.block_size:
        raise ValueError(f"prompt has {prompt.shape[1]} tokens, more than block_size={c.block_size}")
    if prompt.shape[1] + max_new_tokens > c.block_size:
        raise ValueError(f"max_new_tokens={max_new_tokens}: prompt ({prompt.shape[1]}) + new tokens exceed "
                         f"block_size={c.block_size}")
    was_training = model.training
    model.eval()
    try:
        out = prompt.long()
        if max_new_tokens == 0:
            return out
        cache = KVCache(model, prompt.shape[0])
        logits = forward_cached(model, out, cache)[:, -1]
        for i in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
            out = torch.cat([out, token], dim=1)
            if i + 1 < max_new_tokens:
                logits = forward_cached(model, token, cache)[:, -1]
        return out
    finally:
        model.train(was_training)


def expected_touched_experts(probs, batch: int) -> float:
    """Expected distinct experts hit by ``batch`` tokens that route independently.

    ``probs``: ``[E]``, the probability that one token selects each expert (they sum to ``k``), or a pair
    ``(E, k)`` for uniform routing, ``probs = k / E``. Expert ``e`` is missed by all ``batch`` tokens with
    probability ``(1 - p_e) ** batch``, so by linearity of expectation the count is
    ``sum_e 1 - (1 - p_e) ** batch``; uniform: ``E * (1 - (1 - k / E) ** batch)``.
    """
    batch = _checks.positive_int("batch", batch, minimum=0)
    if isinstance(probs, tuple):
        E, k = probs
        _checks.positive_int("num_experts", E)
        _checks.positive_int("k", k)
        if k > E:
            raise ValueError(f"k must be <= num_experts={E}, got {k}")
        return E * (1 - (1 - k / E) ** batch)
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 1 or bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"probs must be a [E] vector of probabilities in [0, 1], got {p.tolist()}")
    return float((1 - (1 - p) ** batch).sum())


def touched_experts(choices: torch.Tensor, batch: int, num_experts: int, *, samples: int = 512,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Distinct experts touched by simulated decode steps of ``batch`` sequences, on recorded routing.

    Args:
        choices: ``[N, T, k]`` int64, the experts one layer chose for ``N`` sequences at ``T`` positions
            (from a forward over real text; the cached forward routes the same).
        batch: sequences per decode step, ``<= N``.
        num_experts: ``E``.
        samples: decode steps to simulate. Each draws ``batch`` distinct sequences and, for each, one
            position (with continuous batching the sequences of a step are at different positions).
        generator: for the draws.

    Returns:
        ``[samples]`` int64, the distinct experts each simulated step touches.
    """
    if not isinstance(choices, torch.Tensor) or choices.dim() != 3:
        raise ValueError(f"choices must be an [N, T, k] tensor, got {getattr(choices, 'shape', type(choices))}")
    N, T, k = choices.shape
    batch = _checks.positive_int("batch", batch)
    if batch > N:
        raise ValueError(f"batch must be <= the {N} recorded sequences, got {batch}")
    samples = _checks.positive_int("samples", samples)
    seqs = torch.rand(samples, N, generator=generator).argsort(dim=1)[:, :batch]  # [S, B] distinct
    pos = torch.randint(T, (samples, batch), generator=generator)
    picked = choices[seqs, pos].reshape(samples, batch * k)  # [S, B * k]
    hit = torch.zeros(samples, num_experts, dtype=torch.bool).scatter_(1, picked, True)
    return hit.sum(dim=1)
