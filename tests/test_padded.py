"""Fixed-size expert buffers (:mod:`moe_ref.padded`): GShard's einsum form and the index form, against hand-made
buffers and against the other implementations of the MoE layer."""

import pytest
import torch
from conftest import close64, reference_output

from moe_ref import IMPLS, CapacityConfig, MoE, RouterConfig, Routing, apply_capacity
from moe_ref.dispatch import permute, sort_by_expert
from moe_ref.padded import buffer_slots, dispatch_tensors, routed_einsum, routed_padded

CONFIGS = {
    "dropless": {},
    "position": dict(capacity=CapacityConfig(capacity_factor=0.75)),
    "choice_batch": dict(capacity=CapacityConfig(capacity_factor=0.75, drop_priority="choice", group="batch")),
    "score_min": dict(capacity=CapacityConfig(capacity_factor=0.5, drop_priority="score", min_capacity=3)),
    "explicit": dict(capacity=CapacityConfig(capacity=2)),
    "sigmoid": dict(router=RouterConfig("sigmoid", n_group=2, topk_group=1),
                    capacity=CapacityConfig(capacity_factor=1.0)),
    "expert_choice": dict(router=RouterConfig("expert_choice", capacity_factor=1.25)),
}


def run(config, impl, x, g):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, impl=impl, **CONFIGS[config])
    x = x.detach().clone().requires_grad_()
    y = moe(x)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    return y, grads, moe


@pytest.mark.parametrize("config", list(CONFIGS))
def test_all_impls_agree_forward_and_backward(config):
    torch.manual_seed(1)
    x = torch.randn(3, 8, 16)
    g = torch.randn(3, 8, 16)
    y_ref, grads_ref, moe_ref_ = run(config, "grouped", x, g)
    if config not in ("dropless", "expert_choice"):
        assert moe_ref_.num_dropped > 0  # the comparison covers drops
    close64(y_ref, reference_output(moe_ref_, x), torch.float32)
    computed = moe_ref_.last_routing.mask if moe_ref_.last_capacity is None else moe_ref_.last_capacity.keep
    for impl in [name for name in IMPLS if name != "grouped"]:
        y, grads, moe = run(config, impl, x, g)
        assert moe.impl == impl
        mine = moe.last_routing.mask if moe.last_capacity is None else moe.last_capacity.keep
        assert (mine is None and computed is None) or torch.equal(mine, computed)  # the same pairs computed
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"{impl} forward")
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{impl} backward")


def hand_routing():
    """3 tokens, 2 experts, k = 1: t0 and t2 to expert 1, t1 to expert 0; capacity 1 drops t2."""
    experts = torch.tensor([[1], [0], [1]])
    weights = torch.tensor([[0.9], [0.6], [0.7]])
    logits = torch.zeros(3, 2)
    routing = Routing(experts, weights, logits, logits.softmax(-1), logits.softmax(-1), torch.tensor([1, 2]))
    return routing, apply_capacity(routing, 1, group_size=3)


def test_dispatch_tensors_by_hand():
    routing, capacity = hand_routing()
    slots, num_slots = buffer_slots(routing, capacity)
    assert slots.tolist() == [[0], [0], [-1]] and num_slots == 1
    dispatch_mask, combine_weights = dispatch_tensors(routing, slots, num_slots)
    assert dispatch_mask.shape == (3, 2, 1) and dispatch_mask.dtype == torch.bool
    expected = torch.zeros(3, 2, 1, dtype=torch.bool)
    expected[0, 1, 0] = expected[1, 0, 0] = True  # t2 is dropped: no slot anywhere
    assert torch.equal(dispatch_mask, expected)
    torch.testing.assert_close(combine_weights, expected * torch.tensor([0.9, 0.6, 0.0]).view(3, 1, 1))


def test_buffers_per_sequence():
    # 2 sequences of 3 tokens, all to expert 0 with capacity 2: rows 0-1 of expert 0's buffer are sequence 0's
    experts = torch.zeros(6, 1, dtype=torch.int64)
    logits = torch.zeros(6, 2)
    routing = Routing(experts, torch.ones(6, 1), logits, logits, logits, torch.tensor([6, 0]))
    capacity = apply_capacity(routing, 2, group_size=3)
    slots, num_slots = buffer_slots(routing, capacity)
    assert num_slots == 4 and slots.view(-1).tolist() == [0, 1, -1, 2, 3, -1]
    dispatch_mask, _ = dispatch_tensors(routing, slots, num_slots)
    assert dispatch_mask.sum().item() == 4 and dispatch_mask[:, 1].sum().item() == 0


def test_einsum_and_index_buffers_equal():
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, capacity=CapacityConfig(capacity_factor=0.75))
    x = torch.randn(2, 6, 16)
    moe(x)
    routing, capacity = moe.last_routing, moe.last_capacity
    assert capacity.num_dropped > 0
    x_flat = x.reshape(12, 16)
    slots, C = buffer_slots(routing, capacity)
    assert C == 2 * capacity.capacity  # one block of C slots per sequence
    dispatch_mask, combine_weights = dispatch_tensors(routing, slots, C)
    # every kept pair occupies exactly one slot, every slot holds at most one pair
    assert dispatch_mask.sum().item() == int(capacity.keep.sum()) and dispatch_mask.sum(0).max() <= 1
    kept_weights = torch.where(capacity.keep, routing.combine_weights, 0.0)
    torch.testing.assert_close(combine_weights.sum((1, 2)), kept_weights.sum(1))
    einsum_buffers = torch.einsum("tec,td->ecd", dispatch_mask.float(), x_flat)
    index_buffers = torch.zeros(4 * C, 16)
    kept = capacity.keep
    rows = (routing.expert_indices * C + slots)[kept]
    index_buffers[rows] = x_flat.unsqueeze(1).expand(12, 2, 16)[kept]
    assert torch.equal(einsum_buffers, index_buffers.view(4, C, 16))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_padded_bmm_equals_grouped(activation):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, activation=activation)
    x = torch.randn(10, 16, requires_grad=True)
    plan = sort_by_expert(moe.router(x))
    counts = plan.tokens_per_expert.tolist()
    x_sorted = permute(x, plan)
    grouped = moe.experts(x_sorted, plan.offsets)
    padded_in = torch.zeros(4, max(counts), 16)
    start = 0
    for e, n in enumerate(counts):
        padded_in[e, :n] = x_sorted[start:start + n]
        start += n
    padded = moe.experts.padded(padded_in)
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(padded[e, :n], grouped[start:start + n], atol=1e-5, rtol=1e-5)
        start += n
    g = torch.randn_like(grouped)
    unchecked = moe.experts(x_sorted, plan.offsets, check=False)
    assert torch.equal(unchecked, grouped)
    a = torch.autograd.grad(grouped, [x, moe.experts.w_in], g, retain_graph=True)
    b = torch.autograd.grad(unchecked, [x, moe.experts.w_in], g)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("impl", ["einsum", "padded"])
def test_padded_impls_bfloat16_and_empty(impl):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, impl=impl, capacity=CapacityConfig(capacity_factor=1.0))
    x = torch.randn(2, 5, 16)
    y = moe.bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    close64(y, reference_output(moe, x.bfloat16()), torch.bfloat16)
    assert moe(torch.randn(2, 0, 16, dtype=torch.bfloat16)).shape == (2, 0, 16)


@pytest.mark.parametrize("routed", [routed_einsum, routed_padded])
def test_routed_functions_by_hand(routed):
    # the hand routing of test_dispatch_tensors_by_hand on real experts: t2 is dropped, t0 and t1 are weighted
    routing, capacity = hand_routing()
    torch.manual_seed(0)
    moe = MoE(4, 6, 2, 1)
    x = torch.randn(3, 4)
    out = routed(moe.experts, x, routing, capacity)
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    expected = torch.stack([0.9 * moe.experts.expert(1, x[:1])[0], 0.6 * moe.experts.expert(0, x[1:2])[0],
                            torch.zeros(4)])
    torch.testing.assert_close(out, expected)
    # without a capacity record: dropless, buffers sized to the busiest expert (expert 1, 2 tokens)
    slots, num_slots = buffer_slots(routing)
    assert num_slots == 2 and slots.view(-1).tolist() == [0, 0, 1]
    expected[2] = 0.7 * moe.experts.expert(1, x[2:])[0]
    torch.testing.assert_close(routed(moe.experts, x, routing), expected)


@pytest.mark.parametrize("impl", ["einsum", "padded"])
def test_non_finite_token_stays_with_its_token(impl):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, impl=impl).eval()
    x = torch.randn(6, 16)
    x[2, 3] = float("inf")
    y = moe(x)
    assert not torch.isfinite(y[2]).all()
    finite = torch.arange(6) != 2
    assert torch.isfinite(y[finite]).all()
    moe.impl = "naive"
    torch.testing.assert_close(y[finite], moe(x)[finite])
