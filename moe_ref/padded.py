"""Chapter 4: dispatch and combine with fixed-size expert buffers, the GShard way and the index way.

With a capacity (:mod:`moe_ref.capacity`), every expert gets a buffer of ``C`` slots per group, so the
expert compute has a fixed shape ``[E, C, d_model]`` and is one batched matmul per projection
(``torch.bmm``), with no ragged groups. Filling the buffers (dispatch) and reading them back (combine) can be
written two ways, which give the same result:

* **einsum** (GShard :cite:p:`lepikhin2021gshard`; Switch :cite:p:`fedus2022switch`): two dense
  ``[T, E, C]`` tensors, ``dispatch_mask[t, e, c]`` (token ``t`` sits in slot ``c`` of expert ``e``) and
  ``combine_weights[t, e, c]`` (its weight there, else 0); then
  ``x_padded = einsum("tec,td->ecd", dispatch_mask, x)`` and
  ``out = einsum("tec,ecd->td", combine_weights, y_padded)``. Easy to read and to shard, but ``T * E * C``
  entries, most of them zero: ``O(T^2)`` memory for a fixed capacity factor.
* **index** (gather/scatter): the slot of each kept pair as a flat index ``expert * C + slot``; dispatch
  copies the token rows into their slots (``index_copy``) and combine gathers them back, weights them and
  sums each token's rows (:func:`~moe_ref.dispatch.combine_pairs`). ``O(T * k)`` indices, the form fast
  implementations use.

The ragged alternative, without any padding, is :func:`~moe_ref.dispatch.routed_grouped` (sort, grouped
matmul, :mod:`moe_ref.kernels.grouped_mm`). Without a capacity limit the buffers here are sized to the busiest
expert, so the padded forms compute the dropless layer too (wastefully when the load is uneven).

A buffer slot that no pair fills holds zeros; the bias-free experts map it to zeros, and its combine weight
is 0 anyway.

**Non-finite input.** The einsum form multiplies every token by the zeros of the one-hot tensors, and
``0 * inf`` is NaN: one token holding ``inf`` would turn every buffer, and so every token's output, into NaN.
:func:`routed_einsum` therefore dispatches the tokens with their non-finite rows zeroed and gives those
tokens a NaN output afterwards (if they were routed at all), so the damage stays with the token that
carried it, as in the other implementations. Both forms combine in float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .capacity import CapacityRecord, queue_positions
from .dispatch import combine_pairs, computed_mask
from .experts import Experts
from .routing import Routing, router_float


def buffer_slots(routing: Routing, capacity: CapacityRecord | None = None) -> tuple[torch.Tensor, int]:
    """Where each (token, slot) pair sits in its expert's padded buffer.

    With a capacity record, expert ``e``'s buffer holds ``G * C`` rows, ``C`` for each of the ``G`` groups in
    turn; pair ``(t, j)`` of group ``g`` goes to row ``g * C + positions[t, j]``. Without one (dropless token
    choice, expert choice), one queue per expert in position order, sized to the busiest expert.

    Returns:
        ``(slots, num_slots)``: ``[T, slots]`` int64 rows (``-1`` for a pair that is not computed) and the
        rows per expert buffer.
    """
    T = routing.num_tokens
    if capacity is not None:
        group = torch.arange(T, device=capacity.positions.device) // max(capacity.group_size, 1)
        rows = group.unsqueeze(1) * capacity.capacity + capacity.positions
        num_groups = T // capacity.group_size if capacity.group_size else 0
        return torch.where(capacity.keep, rows, -1), num_groups * capacity.capacity
    positions = queue_positions(routing.expert_indices, routing.num_experts, group_size=max(T, 1),
                                mask=computed_mask(routing))
    return positions, int(positions.max()) + 1 if positions.numel() else 0


def dispatch_tensors(routing: Routing, slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard's one-hot dispatch and combine tensors.

    ``combine_weights = sum_j w[t, j] * onehot(expert[t, j])[e] * onehot(slot[t, j])[c]`` over the computed
    pairs, and ``dispatch_mask`` the same sum of one-hots without the weights (a pair of weight 0 is still
    dispatched).

    Args:
        routing: the :class:`~moe_ref.routing.Routing`.
        slots: ``[T, slots]`` int64 buffer rows, ``-1`` for pairs not computed (:func:`buffer_slots`).
        num_slots: ``C``, rows per expert buffer.

    Returns:
        ``(dispatch_mask, combine_weights)``: ``[T, E, C]`` bool and ``[T, E, C]`` float32 (differentiable in
        ``routing.combine_weights``).
    """
    kept = (slots >= 0).unsqueeze(-1)  # [T, slots, 1]
    weights = routing.combine_weights
    expert_onehot = F.one_hot(routing.expert_indices, routing.num_experts).to(weights.dtype)
    slot_onehot = (F.one_hot(slots.clamp(min=0), max(num_slots, 1))[..., :num_slots] * kept).to(weights.dtype)
    dispatch_mask = torch.einsum("tke,tkc->tec", expert_onehot, slot_onehot) > 0
    combine_weights = torch.einsum("tk,tke,tkc->tec", weights, expert_onehot, slot_onehot)
    return dispatch_mask, combine_weights


def routed_einsum(experts: Experts, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Routed experts, GShard's way: one-hot einsum dispatch, padded ``bmm`` experts, einsum combine.

    Args:
        experts: the :class:`~moe_ref.experts.Experts`.
        x: ``[T, d_model]``, in the compute dtype.
        routing: its :class:`~moe_ref.routing.Routing`.
        capacity: the capacity record, or ``None`` (buffers sized to the busiest expert).
        backend: unused (the padded forms use ``torch.bmm``).

    Returns:
        ``[T, d_model]`` float32 (float64 for float64 ``x``).
    """
    slots, num_slots = buffer_slots(routing, capacity)
    dispatch_mask, combine_weights = dispatch_tensors(routing, slots, num_slots)
    finite = torch.isfinite(x).all(dim=-1, keepdim=True)  # [T, 1]
    x_finite = torch.where(finite, x, torch.zeros_like(x))  # 0 * inf would be NaN in every buffer
    x_padded = torch.einsum("tec,td->ecd", dispatch_mask.to(x.dtype), x_finite)  # [E, C, d]
    y_padded = router_float(experts.padded(x_padded))
    out = torch.einsum("tec,ecd->td", combine_weights.to(y_padded.dtype), y_padded)
    computed = (slots >= 0).any(dim=1, keepdim=True)  # padding and fully dropped tokens stay 0, as elsewhere
    return torch.where(finite | ~computed, out, torch.full_like(out, float("nan")))


def routed_padded(experts: Experts, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Routed experts with index dispatch into padded buffers: scatter, padded ``bmm`` experts, gather.

    Same result as :func:`routed_einsum` without the ``[T, E, C]`` tensors; arguments and result as there.
    """
    T, d = x.shape
    E, k = routing.num_experts, routing.slots
    slots, num_slots = buffer_slots(routing, capacity)
    pair_ids, token_ids, expert_ids, weights = routing.assignments(slots >= 0)  # [A] each
    buffer_rows = expert_ids * num_slots + slots.reshape(-1)[pair_ids]  # [A] rows of [E * C, d]
    x_padded = x.new_zeros(E * num_slots, d).index_copy(0, buffer_rows, x.index_select(0, token_ids))
    y_padded = experts.padded(x_padded.view(E, num_slots, d)).reshape(E * num_slots, d)
    return combine_pairs(y_padded.index_select(0, buffer_rows), weights, pair_ids, T, k)
