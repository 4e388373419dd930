"""Chapter 4: expert capacity, and which (token, expert) pairs are dropped when an expert is full.

A token-choice router (:mod:`moe_ref.routing`) lets every token pick its ``k`` experts, so an expert may be
picked by any number of tokens. Fixed-shape implementations (Lepikhin et al. 2021 GShard; Fedus et al. 2022
Switch) give each expert a buffer of ``C`` slots per *group* of tokens, its **capacity**; the pairs that do
not fit are **dropped**: they contribute zero to the token's output, so the residual stream carries the
token through the layer unchanged.

The capacity formula (:func:`expert_capacity`) is DeepSpeed-MoE's (Rajbhandari et al. 2022):

.. code-block:: text

    C = min(S, max(min_capacity, ceil(capacity_factor * S * k / E)))

for a group of ``S`` tokens routed to ``k`` of ``E`` experts each. ``S * k / E`` is the load of an expert
under perfect balance, so ``capacity_factor = 1`` leaves no slack and ``capacity_factor = E / k`` can never
drop anything. It is the formula of :func:`~moe_ref.routing.expert_choice_capacity`, so a capacity factor
means the same number of slots per expert for token choice and for expert choice (Zhou et al. 2022). The
codebases differ: Mesh-TensorFlow leaves ``k`` out and rounds down (``min(S, int(cf * S / E))``), Flaxformer
leaves ``k`` out and rounds to nearest (``int(round(cf * S / E))``, at least 4), MegaBlocks (Gale et al.
2023) rounds down; keeping ``k`` makes ``capacity_factor``
independent of ``k``, and rounding up never gives a capacity below the balanced load. ``C`` never exceeds
``S``: a token picks an expert at most once, so an expert cannot receive more than ``S`` pairs from a group.

Which pairs are dropped is set by the drop priority (:func:`queue_positions`). Each expert fills its ``C``
slots, in each group, in priority order:

* ``"position"``: in position order, earlier tokens first (Switch; ``transformers``' Switch). With
  ``capacity_group="sequence"`` whether a token is dropped depends only on the tokens before it in its own
  sequence, so the rule is causal and independent of the rest of the batch.
* ``"choice"``: all first choices (slot 0) before any second choice, each in position order (GShard).
* ``"score"``: batch-prioritised routing (Riquelme et al. 2021, V-MoE): like ``"choice"``, but the tokens in
  decreasing order of their top routing score, so the tokens the router is most confident about are kept.
  It looks at the whole group, future positions included.

The kept weights are **not** renormalised after a drop (as in Switch and GShard): a token that loses its
second expert keeps the first expert's weight unchanged, and a token that loses all its experts gets an MoE
output of zero.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from .routing import Routing

#: Values of ``drop_priority``.
DROP_PRIORITIES = ("position", "choice", "score")
#: Values of ``capacity_group``: capacity counted per sequence, or over all the tokens of the forward call.
CAPACITY_GROUPS = ("sequence", "batch")


def expert_capacity(num_tokens: int, num_experts: int, k: int, *, capacity_factor: float | None = None,
                    capacity: int | None = None, min_capacity: int = 0) -> int:
    """Slots per expert for a group of ``num_tokens`` tokens: ``min(S, max(min_capacity, C0))``.

    ``C0`` is ``capacity`` when given, ``ceil(capacity_factor * S * k / E)`` otherwise (see the module
    docstring for the formula and why).

    Args:
        num_tokens: ``S``, tokens in the group, ``>= 0``.
        num_experts: ``E``.
        k: experts per token.
        capacity_factor: multiplies the balanced load ``S * k / E``; finite and ``> 0``.
        capacity: an explicit capacity ``>= 1`` instead of ``capacity_factor`` (exactly one of the two).
        min_capacity: a floor, as DeepSpeed-MoE's ``min_capacity`` (default 0, no floor).

    Returns:
        ``C``, an int in ``[0, S]`` (0 only for an empty group).
    """
    _checks.positive_int("num_tokens", num_tokens, minimum=0)
    _checks.positive_int("num_experts", num_experts)
    _checks.positive_int("k", k)
    _checks.positive_int("min_capacity", min_capacity, minimum=0)
    if (capacity_factor is None) == (capacity is None):
        raise ValueError("give exactly one of capacity_factor and capacity")
    if capacity is not None:
        slots = _checks.positive_int("capacity", capacity)
    else:
        capacity_factor = _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
        # round() first so that a product such as 1.1 * 10 = 11.000000000000002 does not ceil to 12
        slots = math.ceil(round(capacity_factor * num_tokens * k / num_experts, 9))
    return min(num_tokens, max(min_capacity, slots))


def queue_positions(expert_indices: torch.Tensor, num_experts: int, *, group_size: int,
                    drop_priority: str = "position", scores: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each pair's place in its expert's queue within its group, in priority order (0 = served first).

    The ``T`` tokens form ``T / group_size`` consecutive groups. Within a group, the pairs routed to expert
    ``e`` are ranked by ``drop_priority`` (see the module docstring); a pair is kept by a capacity ``C``
    exactly when its position is ``< C``. Computed with one sort, not with the ``[T, k, E]`` one-hot cumsum
    of Mesh-TensorFlow (same result, less memory).

    Args:
        expert_indices: ``[T, k]`` int64, the experts of each token, slot 0 the first choice.
        num_experts: ``E``.
        group_size: ``S``, tokens per group; must divide ``T``.
        drop_priority: ``"position"``, ``"choice"`` or ``"score"``.
        scores: ``[T, E]`` router scores, needed for ``"score"``: a token's priority is the largest score
            among its ``k`` experts.
        mask: ``[T, k]`` bool, the pairs that take a place; the others get position ``-1``. ``None``: all.

    Returns:
        ``[T, k]`` int64 positions.
    """
    _checks.choice("drop_priority", drop_priority, DROP_PRIORITIES)
    T, k = expert_indices.shape
    _checks.positive_int("group_size", group_size)
    if T % group_size:
        raise ValueError(f"group_size must divide the number of tokens T={T}, got group_size={group_size}")
    device = expert_indices.device
    S, G = group_size, T // group_size
    token = torch.arange(S, device=device).repeat(G)  # [T] position of each token in its group
    if drop_priority == "score":
        if scores is None:
            raise ValueError("drop_priority='score' needs the router scores")
        priority = scores.gather(1, expert_indices).amax(dim=1).view(G, S)  # [G, S] top score of each token
        order = torch.argsort(-priority, dim=1, stable=True)  # ties: earlier token first
        token = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=device).expand(G, S)).view(T)
    slot = torch.arange(k, device=device)
    if drop_priority == "position":
        rank = token.unsqueeze(1) * k + slot  # [T, k] token-major
    else:
        rank = slot * S + token.unsqueeze(1)  # [T, k] choice-major: all slot-0 pairs first
    group = torch.arange(G, device=device).repeat_interleave(S).unsqueeze(1)  # [T, 1]
    queue = group * num_experts + expert_indices  # [T, k] which (group, expert) queue
    if mask is not None:
        queue = torch.where(mask, queue, G * num_experts)  # a last, dummy queue for pairs that take no place
    key = (queue * (S * k) + rank).reshape(-1)
    order = torch.argsort(key)
    queue_sorted = queue.reshape(-1)[order]
    counts = torch.bincount(queue_sorted, minlength=G * num_experts + 1)
    starts = counts.cumsum(0) - counts
    position_sorted = torch.arange(order.numel(), device=device) - starts[queue_sorted]
    positions = torch.empty_like(position_sorted).scatter_(0, order, position_sorted).view(T, k)
    return positions if mask is None else torch.where(mask, positions, -1)


def apply_capacity(routing: Routing, capacity: int, *, group_size: int, drop_priority: str = "position"
                   ) -> Routing:
    """Drop the (token, expert) pairs that do not fit in ``capacity`` slots per expert and group.

    Args:
        routing: a token-choice :class:`~moe_ref.routing.Routing` (``mask`` ``None``).
        capacity: ``C``, slots per expert in each group (see :func:`expert_capacity`).
        group_size: tokens per group (sequence length, or ``T`` for the whole batch); must divide ``T``.
        drop_priority: see :func:`queue_positions`.

    Returns:
        A new :class:`~moe_ref.routing.Routing` with ``mask`` (kept pairs), ``dropped`` (``~mask``),
        ``positions`` (slot of each kept pair in its expert's buffer for its group, ``-1`` if dropped),
        ``capacity``, ``group_size`` and ``combine_weights`` zeroed on the dropped pairs (not renormalised).
        ``expert_indices``, the router outputs and ``tokens_per_expert`` (the router's demand, before drops)
        are those of ``routing``.
    """
    if routing.mask is not None:
        raise ValueError("apply_capacity takes a token-choice routing (mask None), not an expert-choice one")
    _checks.positive_int("capacity", capacity, minimum=0)
    positions = queue_positions(routing.expert_indices, routing.num_experts, group_size=group_size,
                                drop_priority=drop_priority, scores=routing.router_scores)
    keep = positions < capacity
    return Routing(routing.expert_indices, torch.where(keep, routing.combine_weights, 0.0), routing.router_logits,
                   routing.router_scores, routing.router_probs, routing.tokens_per_expert, mask=keep,
                   capacity=capacity, dropped=~keep, positions=torch.where(keep, positions, -1),
                   group_size=group_size)
