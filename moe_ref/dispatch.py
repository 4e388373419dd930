"""Chapters 2 and 5: dispatch and combine for ragged expert groups: sort, permute, combine.

The fast, dropless path of the MoE layer (``impl="grouped"``):

1. **sort** (:func:`sort_by_expert`): the (token, expert) assignments that are computed (the router's,
   minus padding and capacity drops) are sorted by expert into a :class:`DispatchPlan` with the group
   boundaries ``offsets``;
2. **permute** (:func:`permute`): gather the token vectors in plan order, ``x_sorted`` ``[A, d_model]``;
3. the experts run on their groups (:meth:`~moe_ref.experts.Experts.forward`, one grouped matmul per
   projection);
4. **combine** (:func:`combine`): weight each output row and sum each token's rows.

The combine accumulates in float32 (float64 for float64) and is deterministic: every (token, slot) pair
owns one row of a ``[T * slots, d_model]`` buffer, written once, and the rows of a token are summed in a fixed
order. An ``index_add_`` into ``[T, d_model]`` in the activation dtype would round every partial sum to
bfloat16, and on a GPU its atomic additions land in a different order from run to run, which changes the
float result once a token has three or more rows (expert choice, ``k >= 3``). When every pair is computed
(dropless, no padding) the buffer is a gather of the expert outputs back into (token, slot) order, and one
batched ``[1, slots] x [slots, d_model]`` product per token weights and sums them; otherwise the kept rows are
written into a zero-filled buffer. On the CPU at the book's spec shape the gather halves the combine's time,
forward and backward (chapter 5).

:func:`routed_naive` computes the same thing with a loop over experts: the readable reference.

:func:`routed_decode` is the decode fast path (chapter 11): the same sort and the same combine, but the
experts run as one plain matmul per projection on each *touched* expert only, after one read of the group
sizes on the host. At a handful of tokens the grouped path's fixed costs (the custom operator, a pass over
every expert, empty ones included, and the plan's bookkeeping) are a large part of the call; the
:class:`~moe_ref.moe.MoE` layer takes this path on the CPU without autograd for at most
``MoE.decode_max_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks
from .capacity import CapacityRecord
from .experts import Experts, _matmul
from .ffn import ffn_forward
from .routing import Routing, router_float


@dataclass
class DispatchPlan:
    """The computed assignments sorted by expert: what the grouped expert compute needs.

    Attributes:
        pair_ids: ``[A]`` int64, the flat (token, slot) index ``t * slots + j`` of each sorted assignment.
        token_ids: ``[A]`` int64, its token (a row of ``x_sorted`` is ``x[token_ids[a]]``).
        expert_ids: ``[A]`` int64, its expert, non-decreasing.
        combine_weights: ``[A]`` float32, its combine weight.
        tokens_per_expert: ``[E]`` int64, the size of each expert's group.
        offsets: ``[E]`` int32, cumulative group ends (``offsets[-1] == A``), as
            :func:`~moe_ref.kernels.grouped_mm.grouped_mm` takes them.
        slots: slots per token of the routing (``k``, or ``E`` for expert choice).
        num_tokens: ``T``, the tokens of the routing.
    """

    pair_ids: torch.Tensor
    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    combine_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    offsets: torch.Tensor
    slots: int
    num_tokens: int


def computed_mask(routing: Routing, capacity: CapacityRecord | None = None) -> torch.Tensor | None:
    """``[T, slots]`` bool, the assignments the experts compute: the router's, minus capacity drops.

    ``None`` when every slot is computed.
    """
    return routing.mask if capacity is None else capacity.keep


def sort_by_expert(routing: Routing, capacity: CapacityRecord | None = None) -> DispatchPlan:
    """Step 1: sort the computed (token, expert) assignments of ``routing`` by expert.

    The sort is stable, so within an expert's group the tokens keep their order (and the result is
    deterministic). With a ``capacity`` record, only the kept pairs are in the plan.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    if capacity is not None and not isinstance(capacity, CapacityRecord):
        raise TypeError(f"capacity must be a CapacityRecord or None, got {type(capacity).__name__}")
    pair_ids, token_ids, expert_ids, weights = routing.assignments(computed_mask(routing, capacity))
    order = torch.argsort(expert_ids, stable=True)
    tokens_per_expert = torch.bincount(expert_ids, minlength=routing.num_experts)
    return DispatchPlan(pair_ids=pair_ids[order], token_ids=token_ids[order],
                        expert_ids=expert_ids[order], combine_weights=weights[order],
                        tokens_per_expert=tokens_per_expert, offsets=tokens_per_expert.cumsum(0).to(torch.int32),
                        slots=routing.slots, num_tokens=routing.num_tokens)


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Step 2: ``x`` ``[T, d]`` -> ``x_sorted`` ``[A, d]``, row ``a`` being token ``plan.token_ids[a]``."""
    _checks.float_tensor("x", x)
    if x.dim() != 2 or x.shape[0] != plan.num_tokens:
        raise ValueError(f"x must be [T, d] with T={plan.num_tokens} (the plan's tokens), got shape {tuple(x.shape)}")
    return x.index_select(0, plan.token_ids)


def combine_pairs(y_pairs: torch.Tensor, weights: torch.Tensor, pair_ids: torch.Tensor, num_tokens: int,
                  slots: int) -> torch.Tensor:
    """The weighted sum of each token's expert outputs, deterministic, in float32 (float64 for float64).

    Args:
        y_pairs: ``[A, d]`` expert outputs, one per computed (token, slot) pair, in any order.
        weights: ``[A]`` their combine weights.
        pair_ids: ``[A]`` int64 their flat (token, slot) index ``t * slots + j``, each at most once.
        num_tokens: ``T``.
        slots: slots per token.

    Returns:
        ``[T, d]``; a token with no computed pair gets zeros.
    """
    acc = router_float(y_pairs)
    weights = weights.to(acc.dtype)
    d = y_pairs.shape[-1]
    if pair_ids.shape[0] == num_tokens * slots:
        # every pair computed (dropless, no padding): pair_ids is a permutation, so gather the rows back into
        # (token, slot) order and let one batched [1, slots] x [slots, d] product per token weight and sum
        # them: no zero-filled buffer, one pass fewer, and a backward that gathers instead of scattering
        positions = torch.arange(len(pair_ids), device=pair_ids.device)
        inverse = torch.empty_like(pair_ids).index_copy_(0, pair_ids, positions)
        rows = acc.index_select(0, inverse).view(num_tokens, slots, d)
        return torch.bmm(weights.index_select(0, inverse).view(num_tokens, 1, slots), rows).view(num_tokens, d)
    weighted = acc * weights.unsqueeze(-1)
    rows = weighted.new_zeros(num_tokens * slots, d).index_copy(0, pair_ids, weighted)  # each row written once
    return rows.view(num_tokens, slots, d).sum(dim=1)


def combine(y_sorted: torch.Tensor, plan: DispatchPlan, num_tokens: int | None = None) -> torch.Tensor:
    """Step 4: ``y_sorted`` ``[A, d]`` -> ``[T, d]``, the combine-weighted sum of each token's rows
    (:func:`combine_pairs`). ``num_tokens``, if given, must be the plan's ``T``."""
    _checks.float_tensor("y_sorted", y_sorted)
    A = plan.pair_ids.shape[0]
    if y_sorted.dim() != 2 or y_sorted.shape[0] != A:
        raise ValueError(f"y_sorted must be [A, d] with A={A} (the plan's assignments), got {tuple(y_sorted.shape)}")
    if num_tokens is not None and num_tokens != plan.num_tokens:
        raise ValueError(f"num_tokens must be the plan's T={plan.num_tokens}, got {num_tokens}")
    return combine_pairs(y_sorted, plan.combine_weights, plan.pair_ids, plan.num_tokens, plan.slots)


def routed_grouped(experts: Experts, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Routed experts, the fast way: sort, permute, grouped matmuls, combine. ``[T, d] -> [T, d]`` float32."""
    plan = sort_by_expert(routing, capacity)
    y_sorted = experts(permute(x, plan), plan.offsets, backend=backend, check=False)
    return combine(y_sorted, plan, x.shape[0])


def routed_naive(experts: Experts, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """Routed experts, the readable reference: a loop over the experts. ``[T, d] -> [T, d]`` float32.

    For each expert, find the (token, slot) pairs it computes, run it on those tokens and add its weighted
    output to theirs. Every expert runs, even on no tokens, so the output always has a gradient path.
    """
    return loop_over_experts(experts.expert, x, routing, capacity, range(routing.num_experts))


def loop_over_experts(run_expert, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None,
                      expert_ids) -> torch.Tensor:
    """The loop of :func:`routed_naive` over ``expert_ids``: ``run_expert(e, rows)`` on each expert's computed
    rows, weighted and added into its tokens' output. ``[T, d] -> [T, d]`` float32 (float64 for float64).

    :func:`routed_naive` runs every expert; the offloaded layer (:mod:`moe_ref.offload`) only the touched
    ones, with weights fetched from its cache.
    """
    mask = computed_mask(routing, capacity)
    out = x.new_zeros(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    for e in expert_ids:
        selected = routing.expert_indices == e
        if mask is not None:
            selected = selected & mask
        token_ids, slots = torch.nonzero(selected, as_tuple=True)
        weights = routing.combine_weights[token_ids, slots].unsqueeze(-1).to(out.dtype)
        out = out.index_add(0, token_ids, weights * run_expert(e, x[token_ids]).to(out.dtype))
    return out


def routed_decode(experts: Experts, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Routed experts for a few tokens: sort, one plain matmul per projection per touched expert, combine.

    ``[T, d] -> [T, d]`` float32 (float64 for float64), the same function as :func:`routed_grouped` (and the
    same float result where the grouped backend computes each group with ``mm``, as the CPU backends do):
    the pairs are sorted by expert (stable), each touched expert runs on its contiguous rows, and the
    weighted rows are combined in slot order (:func:`combine_pairs`). Reads the group sizes on the host (a
    synchronisation on a GPU), so the layer uses it only on the CPU. ``backend`` is ignored.
    """
    plan = sort_by_expert(routing, capacity)
    x_sorted = permute(x, plan)
    ys, start = [], 0
    for e, n in enumerate(plan.tokens_per_expert.tolist()):  # the one host read
        if n:
            w_up = None if experts.w_up is None else experts.w_up[e]
            ys.append(ffn_forward(x_sorted[start:start + n], experts.act, experts.w_in[e], w_up, experts.w_out[e],
                                  _matmul))
            start += n
    y_sorted = torch.cat(ys) if ys else x.new_zeros(0, x.shape[-1])
    return combine(y_sorted, plan, x.shape[0])
