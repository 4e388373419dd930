"""Chapter 4: expert capacity, and which (token, expert) pairs are dropped when an expert is full.

A token-choice router (:mod:`moe_ref.routing`) lets every token pick its ``k`` experts, so an expert may be
picked by any number of tokens. Fixed-shape implementations, GShard :cite:p:`lepikhin2021gshard` and Switch
:cite:p:`fedus2022switch`, give each expert a buffer of ``C`` slots per *group* of tokens, its **capacity**;
the pairs that do not fit are **dropped**: they contribute zero to the token's output, so the residual stream
carries the token through the layer unchanged.

The capacity formula (:func:`expert_capacity`) is the one of DeepSpeed's code
(``_capacity`` in ``deepspeed/moe/sharded_moe.py`` :cite:p:`deepspeed_sharded_moe`, which its top-k gates
call with ``capacity_factor * k``), clamped to ``S``, which DeepSpeed does not do:

.. code-block:: text

    C = min(S, max(min_capacity, ceil(capacity_factor * S * k / E)))

for a group of ``S`` tokens routed to ``k`` of ``E`` experts each. ``S * k / E`` is the load of an expert
under perfect balance, so ``capacity_factor = 1`` leaves no slack and ``capacity_factor = E / k`` can never
drop anything. It is the formula of :func:`~moe_ref.routing.expert_choice_capacity`, so a capacity factor
means the same number of slots per expert for token choice and for expert choice
:cite:p:`zhou2022expertchoice`. The codebases differ: Mesh-TensorFlow leaves ``k`` out and rounds down
(``min(S, int(cf * S / E))``), Flaxformer leaves ``k`` out and rounds to nearest (``int(round(cf * S / E))``,
at least 4), MegaBlocks :cite:p:`gale2023megablocks` rounds down; keeping ``k`` makes ``capacity_factor``
independent of ``k``, and rounding up never gives a capacity below the balanced load. ``C`` never exceeds
``S``: a token picks an expert at most once, so an expert cannot receive more than ``S`` pairs from a group.

Which pairs are dropped is set by the drop priority (:func:`queue_positions`). Each expert fills its ``C``
slots, in each group, in priority order:

* ``"position"``: in position order, earlier tokens first (Switch; ``transformers``' Switch). With
  ``capacity_group="sequence"`` whether a token is dropped depends only on the tokens before it in its own
  sequence, so the rule is causal and independent of the rest of the batch.
* ``"choice"``: all first choices (slot 0) before any second choice, each in position order (GShard).
* ``"score"``: batch-prioritised routing (V-MoE :cite:p:`riquelme2021vmoe`): like ``"choice"``, but the
  tokens in decreasing order of their top routing score, so the tokens the router is most confident about
  are kept.
  It looks at the whole group, future positions included.

:func:`apply_capacity` returns its own record, :class:`CapacityRecord` (what was kept, where, and what was
dropped), and leaves the router's :class:`~moe_ref.routing.Routing` as it was. Padding tokens (a ``False``
in the routing's ``mask``) take no slot.

The kept weights are **not** renormalised after a drop (as in Switch and GShard): a token that loses its
second expert keeps the first expert's weight unchanged, and a token that loses all its experts gets an MoE
output of zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks
from .routing import Routing

#: Values of ``drop_priority``.
DROP_PRIORITIES = ("position", "choice", "score")
#: Values of ``group``: capacity counted per sequence, or over all the tokens of the forward call.
CAPACITY_GROUPS = ("sequence", "batch")


@dataclass(frozen=True)
class CapacityConfig:
    """A capacity limit for a token-choice :class:`~moe_ref.moe.MoE` (``capacity=None`` there is dropless).

    Attributes:
        capacity_factor: ``C = ceil(capacity_factor * S * k / E)`` per expert and group of ``S`` tokens
            (:func:`expert_capacity`); ``transformers``/DeepSpeed: ``capacity_factor``.
        capacity: an explicit ``C`` instead (Switch's ``expert_capacity``). Give exactly one of the two.
        min_capacity: a floor on ``C`` (DeepSpeed's ``MoE`` layer defaults to 4).
        group: ``"sequence"`` (default; as ``transformers``' Switch) or ``"batch"`` (all tokens of the call).
        drop_priority: ``"position"`` (default), ``"choice"`` (GShard) or ``"score"`` (V-MoE).
    """

    capacity_factor: float | None = None
    capacity: int | None = None
    min_capacity: int = 0
    group: str = "sequence"
    drop_priority: str = "position"

    def __post_init__(self):
        if (self.capacity_factor is None) == (self.capacity is None):
            raise ValueError("give exactly one of capacity_factor and capacity")
        if self.capacity_factor is not None:
            _checks.finite_float("capacity_factor", self.capacity_factor, minimum=0.0, strict=True)
        if self.capacity is not None:
            _checks.positive_int("capacity", self.capacity)
        _checks.positive_int("min_capacity", self.min_capacity, minimum=0)
        _checks.choice("group", self.group, CAPACITY_GROUPS)
        _checks.choice("drop_priority", self.drop_priority, DROP_PRIORITIES)

    def slots(self, group_size: int, num_experts: int, k: int) -> int:
        """``C`` for a group of ``group_size`` tokens (:func:`expert_capacity`)."""
        return expert_capacity(group_size, num_experts, k, capacity_factor=self.capacity_factor,
                               capacity=self.capacity, min_capacity=self.min_capacity)


@dataclass
class CapacityRecord:
    """What a capacity limit kept and dropped of a routing of ``T`` tokens with ``k`` slots each.

    Attributes:
        capacity: ``C``, slots per expert in each group.
        group_size: tokens per group (the sequence length, or ``T``).
        keep: ``[T, k]`` bool, the assignments that fit.
        positions: ``[T, k]`` int64, each kept pair's slot in its expert's buffer for its group, ``-1``
            otherwise.
        dropped: ``[T, k]`` bool, the assignments the router made that did not fit.
    """

    capacity: int
    group_size: int
    keep: torch.Tensor
    positions: torch.Tensor
    dropped: torch.Tensor

    @property
    def num_dropped(self) -> int:
        """Number of dropped (token, expert) pairs."""
        return int(self.dropped.sum())

    @property
    def drop_rate(self) -> float:
        """Fraction of the router's assignments (padding excluded) that were dropped; 0.0 without any."""
        assigned = int(self.keep.sum()) + int(self.dropped.sum())
        return self.num_dropped / assigned if assigned else 0.0

    @property
    def tokens_dropped(self) -> int:
        """Tokens that had an assignment and lost all of them, so their routed output is 0."""
        return int((self.dropped.any(dim=1) & ~self.keep.any(dim=1)).sum())

    def dropped_per_expert(self, num_experts: int, expert_indices: torch.Tensor) -> torch.Tensor:
        """``[E]`` int64 dropped pairs of each expert."""
        return torch.bincount(expert_indices[self.dropped], minlength=num_experts)


def expert_capacity(num_tokens: int, num_experts: int, k: int, *, capacity_factor: float | None = None,
                    capacity: int | None = None, min_capacity: int = 0) -> int:
    """Slots per expert for a group of ``num_tokens`` tokens: ``min(S, max(min_capacity, 1, C0))``.

    ``C0`` is ``capacity`` when given, ``ceil(capacity_factor * S * k / E)`` otherwise (see the module
    docstring for the formula and why). A non-empty group always gets at least 1 slot per expert, however
    small the factor: a capacity of 0 would drop every token silently.

    Args:
        num_tokens: ``S``, tokens in the group, ``>= 0``.
        num_experts: ``E``.
        k: experts per token.
        capacity_factor: multiplies the balanced load ``S * k / E``; finite and ``> 0``.
        capacity: an explicit capacity ``>= 1`` instead of ``capacity_factor`` (exactly one of the two).
        min_capacity: a floor, as DeepSpeed's ``min_capacity`` (default 0, no floor beyond 1).

    Returns:
        ``C``, an int in ``[1, S]``, or 0 for an empty group.
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
    return min(num_tokens, max(min_capacity, 1, slots))


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
    if not isinstance(expert_indices, torch.Tensor) or expert_indices.dtype != torch.int64 or expert_indices.dim() != 2:
        raise TypeError(f"expert_indices must be a [T, k] int64 tensor, got {getattr(expert_indices, 'dtype', None)} "
                        f"{tuple(getattr(expert_indices, 'shape', ()))}")
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
        priority = scores.detach().gather(1, expert_indices)
        if mask is not None:  # pairs that take no place do not lend their token priority
            priority = priority.masked_fill(~mask, float("-inf"))
        priority = priority.amax(dim=1).view(G, S)  # [G, S] top score of each token
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
                   ) -> CapacityRecord:
    """Which (token, expert) pairs fit in ``capacity`` slots per expert and group.

    Args:
        routing: a token-choice :class:`~moe_ref.routing.Routing`; its ``mask``, if any, marks padding,
            whose pairs take no slot and are not counted as dropped.
        capacity: ``C``, slots per expert in each group (see :func:`expert_capacity`).
        group_size: tokens per group (sequence length, or ``T`` for the whole batch); must divide ``T``.
        drop_priority: see :func:`queue_positions`.

    Returns:
        The :class:`CapacityRecord`. ``routing`` is not changed.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    _checks.positive_int("capacity", capacity, minimum=0)
    T = routing.num_tokens
    if T == 0:
        empty = torch.zeros_like(routing.expert_indices, dtype=torch.bool)
        return CapacityRecord(capacity, group_size, empty, torch.full_like(routing.expert_indices, -1), empty)
    positions = queue_positions(routing.expert_indices, routing.num_experts, group_size=group_size,
                                drop_priority=drop_priority, scores=routing.router_scores, mask=routing.mask)
    assigned = positions >= 0
    keep = assigned & (positions < capacity)
    return CapacityRecord(capacity=capacity, group_size=group_size, keep=keep,
                          positions=torch.where(keep, positions, -1), dropped=assigned & ~keep)
