"""Sort, permute and combine (:mod:`moe_ref.dispatch`) on routings written by hand; the fixed-size buffers of
:mod:`moe_ref.padded` are tested in ``test_padded.py``."""

import pytest
import torch

from moe_ref import MoE, Routing, apply_capacity
from moe_ref.dispatch import combine, combine_pairs, permute, routed_grouped, routed_naive, sort_by_expert

# 3 tokens, 3 experts, k = 2: t0 -> (2, 0), t1 -> (0, 1), t2 -> (2, 0)
EXPERTS = torch.tensor([[2, 0], [0, 1], [2, 0]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])


def hand_routing(mask=None):
    logits = torch.zeros(3, 3)
    chosen = EXPERTS.reshape(-1) if mask is None else EXPERTS[mask]
    return Routing(EXPERTS, WEIGHTS if mask is None else WEIGHTS * mask, logits, logits.softmax(-1),
                   logits.softmax(-1), torch.bincount(chosen, minlength=3), mask=mask)


def test_sort_by_expert_by_hand():
    plan = sort_by_expert(hand_routing())
    # expert 0: pairs (t0, 1), (t1, 0), (t2, 1); expert 1: (t1, 1); expert 2: (t0, 0), (t2, 0); stable order
    assert plan.pair_ids.tolist() == [1, 2, 5, 3, 0, 4]
    assert plan.token_ids.tolist() == [0, 1, 2, 1, 0, 2]
    assert plan.expert_ids.tolist() == [0, 0, 0, 1, 2, 2]
    torch.testing.assert_close(plan.combine_weights, torch.tensor([0.4, 0.7, 0.5, 0.3, 0.6, 0.5]))
    assert plan.tokens_per_expert.tolist() == [3, 1, 2]
    assert plan.offsets.tolist() == [3, 4, 6] and plan.offsets.dtype == torch.int32 and plan.slots == 2


def test_sort_by_expert_leaves_out_padding_and_drops():
    mask = torch.tensor([[True, True], [False, False], [True, True]])  # t1 is padding
    plan = sort_by_expert(hand_routing(mask))
    assert plan.pair_ids.tolist() == [1, 5, 0, 4] and plan.offsets.tolist() == [2, 2, 4]
    # capacity 1 per expert (one group of 3 tokens, position order): t2's pairs do not fit
    routing = hand_routing()
    capacity = apply_capacity(routing, 1, group_size=3)
    assert capacity.dropped.tolist() == [[False, False], [True, False], [True, True]]
    plan = sort_by_expert(routing, capacity)
    assert plan.pair_ids.tolist() == [1, 3, 0] and plan.token_ids.tolist() == [0, 1, 0]
    assert plan.tokens_per_expert.tolist() == [1, 1, 1]


def test_permute_and_combine_by_hand():
    routing = hand_routing()
    plan = sort_by_expert(routing)
    x = torch.arange(3 * 4, dtype=torch.float32).view(3, 4)
    x_sorted = permute(x, plan)
    assert torch.equal(x_sorted, x[[0, 1, 2, 1, 0, 2]])
    # with identity experts, combine gives back each token times the sum of its weights
    out = combine(x_sorted, plan, 3)
    torch.testing.assert_close(out, x * WEIGHTS.sum(1, keepdim=True))
    # a token without computed pairs gets zeros
    capacity = apply_capacity(routing, 1, group_size=3)
    plan = sort_by_expert(routing, capacity)
    out = combine(permute(x, plan), plan, 3)
    torch.testing.assert_close(out, torch.stack([x[0], 0.3 * x[1], torch.zeros(4)]))  # t1 keeps its 2nd pair


def test_combine_accumulates_in_float32_and_is_order_free():
    torch.manual_seed(0)
    y = torch.randn(6, 8).bfloat16()
    weights = torch.rand(6)
    pair_ids = torch.tensor([1, 2, 5, 3, 0, 4])
    out = combine_pairs(y, weights, pair_ids, 3, 2)
    assert out.dtype == torch.float32
    expected = torch.zeros(3, 8)
    for row, pair in enumerate(pair_ids.tolist()):
        expected[pair // 2] += weights[row] * y[row].float()
    torch.testing.assert_close(out, expected)
    order = torch.randperm(6)  # the rows may come in any order: the result is bit for bit the same
    assert torch.equal(combine_pairs(y[order], weights[order], pair_ids[order], 3, 2), out)
    assert combine_pairs(y.double(), weights, pair_ids, 3, 2).dtype == torch.float64


@pytest.mark.parametrize("with_capacity", [False, True])
def test_routed_grouped_equals_naive_equals_by_hand(with_capacity):
    torch.manual_seed(0)
    experts = MoE(4, 6, 3, 2).experts
    x = torch.randn(3, 4, requires_grad=True)
    routing = hand_routing()
    capacity = apply_capacity(routing, 1, group_size=3) if with_capacity else None
    grouped = routed_grouped(experts, x, routing, capacity)
    naive = routed_naive(experts, x, routing, capacity)
    assert grouped.dtype == naive.dtype == torch.float32
    expected = torch.zeros(3, 4)
    for t in range(3):
        for j in range(2):
            if capacity is None or capacity.keep[t, j]:
                e = int(EXPERTS[t, j])
                expected[t] += WEIGHTS[t, j] * experts.expert(e, x[t:t + 1])[0]
    torch.testing.assert_close(grouped, expected)
    torch.testing.assert_close(naive, expected)
    g = torch.randn(3, 4)
    a = torch.autograd.grad(grouped, [x, experts.w_in, experts.w_out], g)
    b = torch.autograd.grad(naive, [x, experts.w_in, experts.w_out], g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
