"""Chapter 3: auxiliary losses of the router: load balance and logit size.

All three losses are returned *unweighted*; the MoE layer multiplies them by its coefficients. They are
computed in float32 (float64 for float64 inputs).

* :func:`load_balancing_loss`: ``E * sum_i f_i P_i`` (Shazeer et al. 2017; Lepikhin et al. 2021 GShard;
  Fedus et al. 2022 Switch), normalised to 1 at perfect balance for any ``k``.
* :func:`router_z_loss`: mean squared log-partition of the router logits (Zoph et al. 2022, ST-MoE).
* :func:`sequence_balance_loss`: DeepSeek-V3's balance loss computed per sequence (DeepSeek-AI 2024).
"""

from __future__ import annotations

import torch

from . import _checks
from .routing import router_float


def _check_routing_pair(probs, expert_indices, probs_name: str = "router_probs") -> None:
    _checks.float_tensor(probs_name, probs, min_dim=2)
    if not isinstance(expert_indices, torch.Tensor) or expert_indices.dtype != torch.int64:
        got = getattr(expert_indices, "dtype", type(expert_indices).__name__)
        raise TypeError(f"expert_indices must be an int64 tensor, got {got}")
    if expert_indices.shape[:-1] != probs.shape[:-1]:
        raise ValueError(f"expert_indices {tuple(expert_indices.shape)} and {probs_name} {tuple(probs.shape)} "
                         f"must agree on all but the last dimension")


def _token_mask(attention_mask, shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor | None:
    """The padding mask as float32 ``[T]`` (1 for real tokens), or ``None``."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.numel() != shape.numel():
        raise ValueError(f"attention_mask must have one entry per token ({shape.numel()}), "
                         f"got shape {tuple(attention_mask.shape)}")
    return attention_mask.reshape(-1).to(device=device, dtype=dtype)


def load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor, *,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Load-balancing loss ``E * sum_i f_i * P_i``, exactly 1 at perfect balance for any ``k``.

    ``f_i`` is the fraction of the ``T * k`` (token, expert) assignments that go to expert ``i`` and ``P_i``
    the mean router probability of expert ``i`` over the ``T`` tokens. Both sum to 1 over the experts, so the
    loss is 1 when both are uniform (``1/E`` each) and grows as routing concentrates. ``f`` is a count and
    carries no gradient; the gradient flows through ``P`` (Fedus et al. 2022): ``d loss / d P_i = E * f_i``, so
    router probability is pushed away from each expert in proportion to its load.

    ``transformers``' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE) divides the counts by ``T``
    instead of ``T * k``, so its ``f`` sums to ``k`` and it equals ``k`` times this loss (``k`` at balance):
    ``hf_loss = k * load_balancing_loss(...)``. With ``k = 1`` the two coincide with Switch's loss.

    Args:
        router_probs: ``[T, E]`` (or ``[..., E]``) rows summing to 1, e.g. ``Routing.router_probs``.
        expert_indices: ``[T, k]`` (or ``[..., k]``) int64, the chosen experts.
        attention_mask: optional, one entry per token (e.g. ``[batch, seq]``), 1 for real tokens and 0 for
            padding, which is left out of both ``f`` and ``P``.

    Returns:
        Scalar float32 tensor.
    """
    _check_routing_pair(router_probs, expert_indices)
    E, k = router_probs.shape[-1], expert_indices.shape[-1]
    probs = router_float(router_probs.reshape(-1, E))
    indices = expert_indices.reshape(-1, k)
    mask = _token_mask(attention_mask, probs.shape[:1], probs.device, probs.dtype)
    if mask is None:
        mask = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    counts = torch.zeros(E, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add_(0, indices.reshape(-1), mask.repeat_interleave(k))
    n_tokens = mask.sum().clamp_min(1.0)  # all-padding batches give 0, not NaN
    f = counts / (n_tokens * k)
    P = (probs * mask.unsqueeze(-1)).sum(dim=0) / n_tokens
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE): mean over tokens of ``logsumexp(logits)^2``.

    It keeps the router logits small, where the float32 exponentials of the softmax are accurate; ST-MoE
    weights it by 0.001.

    Args:
        router_logits: ``[T, E]`` (or ``[..., E]``).
        attention_mask: optional, one entry per token, 1 for real tokens; padding is left out of the mean.

    Returns:
        Scalar float32 tensor.
    """
    _checks.float_tensor("router_logits", router_logits, min_dim=1)
    z = torch.logsumexp(router_float(router_logits), dim=-1).reshape(-1) ** 2
    mask = _token_mask(attention_mask, z.shape, z.device, z.dtype)
    if mask is None:
        return z.mean()
    return (z * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_balance_loss(router_scores: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (DeepSeek-AI 2024), averaged over sequences.

    For each sequence of ``S`` tokens: ``f_i = E / (k * S) * count_i`` (``count_i``: tokens of the sequence
    that chose expert ``i``), ``P_i`` = mean over the sequence of the normalised scores ``s_i / sum_j s_j``,
    loss ``= sum_i f_i * P_i``. It is 1 at perfect balance (``f_i = 1``, ``P_i = 1/E``) and, unlike the
    batch-level :func:`load_balancing_loss`, penalises imbalance within each sequence.

    Args:
        router_scores: ``[B, S, E]`` non-negative scores (sigmoid scores, or softmax probabilities); each row
            is divided by its sum, so ``Routing.router_probs`` can be passed as well.
        expert_indices: ``[B, S, k]`` int64.

    Returns:
        Scalar float32 tensor, the mean over the ``B`` sequences.
    """
    _check_routing_pair(router_scores, expert_indices, "router_scores")
    if router_scores.dim() != 3:
        raise ValueError(f"router_scores must be [batch, seq, E], got shape {tuple(router_scores.shape)}")
    B, S, E = router_scores.shape
    k = expert_indices.shape[-1]
    scores = router_float(router_scores)
    probs = scores / scores.sum(dim=-1, keepdim=True)
    ones = torch.ones(B, S * k, dtype=scores.dtype, device=scores.device)
    counts = torch.zeros(B, E, dtype=scores.dtype, device=scores.device).scatter_add_(
        1, expert_indices.reshape(B, S * k), ones)
    f = counts * (E / (k * S))
    P = probs.mean(dim=1)
    return (f * P).sum(dim=-1).mean()
