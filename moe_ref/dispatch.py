"""Chapter 4: dispatch and combine with fixed-size expert buffers, the GShard way and the index way.

With a capacity (:mod:`moe_ref.capacity`), every expert gets a buffer of ``C`` slots per group, so the
expert compute has a fixed shape ``[E, C, d_model]`` and is one batched matmul per projection
(``torch.bmm``), with no ragged groups. Filling the buffers (dispatch) and reading them back (combine) can be
written two ways, which give the same result:

* **einsum** (Lepikhin et al. 2021, GShard; Fedus et al. 2022, Switch): two dense ``[T, E, C]`` tensors,
  ``dispatch_mask[t, e, c]`` (token ``t`` sits in slot ``c`` of expert ``e``) and ``combine_weights[t, e, c]``
  (its weight there, else 0); then ``x_padded = einsum("tec,td->ecd", dispatch_mask, x)`` and
  ``out = einsum("tec,ecd->td", combine_weights, y_padded)``. Easy to read and to shard, but ``T * E * C``
  entries, most of them zero: ``O(T^2)`` memory for a fixed capacity factor.
* **index** (gather/scatter): the slot of each kept pair as a flat index ``expert * C + slot``; dispatch
  copies the token rows into their slots (``index_copy``) and combine gathers them back, weights them and
  adds them to their tokens (``index_add``). ``O(T * k)`` indices, the form fast implementations use.

The ragged alternative, without any padding, is :meth:`~moe_ref.moe.MoE.experts_grouped` (sort, grouped
matmul, :mod:`moe_ref.grouped_mm`). Without a capacity limit the buffers here are sized to the busiest
expert, so the padded forms compute the dropless layer too (wastefully when the load is uneven).

A buffer slot that no pair fills holds zeros; the bias-free experts map it to zeros, and its combine weight
is 0 anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .capacity import queue_positions
from .routing import Routing


def buffer_slots(routing: Routing) -> tuple[torch.Tensor, int]:
    """Where each (token, slot) pair sits in its expert's padded buffer.

    With a capacity limit (``routing.positions`` set), expert ``e``'s buffer holds ``G * C`` rows, ``C`` for
    each of the ``G`` groups in turn; pair ``(t, j)`` of group ``g`` goes to row ``g * C + positions[t, j]``.
    Without one (dropless token choice, expert choice), one queue per expert in position order, sized to the
    busiest expert.

    Args:
        routing: the :class:`~moe_ref.routing.Routing`.

    Returns:
        ``(slots, num_slots)``: ``[T, k]`` int64 rows (``-1`` for a pair that is not processed) and the rows
        per expert buffer.
    """
    T = routing.num_tokens
    if routing.positions is not None:
        group = torch.arange(T, device=routing.positions.device) // max(routing.group_size, 1)
        slots = group.unsqueeze(1) * routing.capacity + routing.positions
        num_groups = T // routing.group_size if routing.group_size else 0
        return torch.where(routing.positions >= 0, slots, -1), num_groups * routing.capacity
    positions = queue_positions(routing.expert_indices, routing.num_experts, group_size=max(T, 1),
                                mask=routing.mask)
    return positions, int(positions.max()) + 1 if positions.numel() else 0


def dispatch_tensors(routing: Routing, slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard's one-hot dispatch and combine tensors.

    ``combine_weights = sum_j w[t, j] * onehot(expert[t, j])[e] * onehot(slot[t, j])[c]`` over the kept
    pairs, and ``dispatch_mask = combine_weights != 0`` computed from the one-hots (a kept pair of weight
    0 is still dispatched).

    Args:
        routing: the :class:`~moe_ref.routing.Routing`.
        slots: ``[T, k]`` int64 buffer rows, ``-1`` for pairs not processed (:func:`buffer_slots`).
        num_slots: ``C``, rows per expert buffer.

    Returns:
        ``(dispatch_mask, combine_weights)``: ``[T, E, C]`` bool and ``[T, E, C]`` float32 (differentiable in
        ``routing.combine_weights``).
    """
    kept = (slots >= 0).unsqueeze(-1)  # [T, k, 1]
    expert_onehot = F.one_hot(routing.expert_indices, routing.num_experts).to(routing.combine_weights.dtype)
    slot_onehot = F.one_hot(slots.clamp(min=0), max(num_slots, 1))[..., :num_slots] * kept  # [T, k, C]
    slot_onehot = slot_onehot.to(routing.combine_weights.dtype)
    dispatch_mask = torch.einsum("tke,tkc->tec", expert_onehot, slot_onehot) > 0
    combine_weights = torch.einsum("tk,tke,tkc->tec", routing.combine_weights, expert_onehot, slot_onehot)
    return dispatch_mask, combine_weights


def experts_padded(experts: nn.Module, x_padded: torch.Tensor) -> torch.Tensor:
    """Every expert on its buffer: one ``torch.bmm`` per projection.

    Args:
        experts: the :class:`~moe_ref.moe.Experts` (``w_in``, ``w_up``, ``w_out`` stacked ``[E, in, out]``).
        x_padded: ``[E, C, d_model]``.

    Returns:
        ``[E, C, d_model]``.
    """
    hidden = experts.act(torch.bmm(x_padded, experts.w_in))
    if experts.gated:
        hidden = hidden * torch.bmm(x_padded, experts.w_up)
    return torch.bmm(hidden, experts.w_out)


def moe_einsum(experts: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Routed experts, GShard's way: one-hot einsum dispatch, padded ``bmm`` experts, einsum combine.

    Args:
        experts: the :class:`~moe_ref.moe.Experts`.
        x: ``[T, d_model]``.
        routing: its :class:`~moe_ref.routing.Routing` (after any capacity limit).

    Returns:
        ``[T, d_model]``, the dtype of ``x``.
    """
    slots, num_slots = buffer_slots(routing)
    dispatch_mask, combine_weights = dispatch_tensors(routing, slots, num_slots)
    x_padded = torch.einsum("tec,td->ecd", dispatch_mask.to(x.dtype), x)  # [E, C, d]
    y_padded = experts_padded(experts, x_padded)
    return torch.einsum("tec,ecd->td", combine_weights.to(y_padded.dtype), y_padded)


def moe_padded(experts: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Routed experts with index dispatch into padded buffers: scatter, padded ``bmm`` experts, gather.

    Same result as :func:`moe_einsum` without the ``[T, E, C]`` tensors.

    Args:
        experts: the :class:`~moe_ref.moe.Experts`.
        x: ``[T, d_model]``.
        routing: its :class:`~moe_ref.routing.Routing` (after any capacity limit).

    Returns:
        ``[T, d_model]``, the dtype of ``x``.
    """
    T, d = x.shape
    E, k = routing.num_experts, routing.k
    slots, num_slots = buffer_slots(routing)
    kept = (slots >= 0).reshape(-1)
    token_ids = torch.arange(T, device=x.device).repeat_interleave(k)[kept]  # [A]
    buffer_rows = (routing.expert_indices * num_slots + slots).reshape(-1)[kept]  # [A] rows of [E * C, d]
    weights = routing.combine_weights.reshape(-1)[kept]
    x_padded = x.new_zeros(E * num_slots, d).index_copy(0, buffer_rows, x.index_select(0, token_ids))
    y_padded = experts_padded(experts, x_padded.view(E, num_slots, d)).reshape(E * num_slots, d)
    weighted = y_padded.index_select(0, buffer_rows) * weights.unsqueeze(-1).to(y_padded.dtype)
    return x.new_zeros(T, d).index_add(0, token_ids, weighted)
