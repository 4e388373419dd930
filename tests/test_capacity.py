import dataclasses
import math

import pytest
import torch
from conftest import assert_every_drop_counted, close64, reference_output

from moe_ref import (AuxLossConfig, CapacityConfig, CapacityRecord, MoE, RouterConfig, Routing, apply_capacity,
                     expert_capacity, expert_choice_capacity, grouped_mm, load_balancing_loss, queue_positions)
from moe_ref.dispatch import permute, sort_by_expert


# --- the formula ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,cf,min_capacity,expected", [
    (10, 4, 2, 1.1, 0, 6),      # 5.5 -> 6: rounds up
    (8, 4, 1, 1.25, 0, 3),      # 2.5 -> 3
    (10, 1, 1, 1.1, 0, 10),     # 1.1 * 10 = 11.000000000000002 must not ceil to 12; then capped at T = 10
    (20, 2, 1, 1.1, 0, 11),     # 11.000000000000002 -> 11
    (1, 8, 1, 1.0, 0, 1),       # tiny T: 0.125 -> 1
    (3, 8, 2, 1.0, 0, 1),       # 0.75 -> 1
    (64, 8, 1, 0.01, 0, 1),     # 0.08 -> 1: a non-empty group never gets 0 slots
    (3, 8, 1, 10.0, 0, 3),      # never more than T
    (16, 8, 1, 1.0, 0, 2),
    (16, 8, 1, 1.0, 4, 4),      # min_capacity
    (3, 8, 1, 1.0, 4, 3),       # min_capacity, then at most T
    (0, 8, 2, 1.0, 4, 0),       # an empty group has no slots
    (12, 4, 2, 0.5, 0, 3),
])
def test_capacity_formula(T, E, k, cf, min_capacity, expected):
    assert expert_capacity(T, E, k, capacity_factor=cf, min_capacity=min_capacity) == expected


def test_explicit_capacity():
    assert expert_capacity(10, 4, 2, capacity=3) == 3
    assert expert_capacity(10, 4, 2, capacity=64) == 10  # Switch's expert_capacity=64 on a 10-token sequence
    assert expert_capacity(10, 4, 2, capacity=1, min_capacity=2) == 2
    assert expert_capacity(0, 4, 2, capacity=3) == 0
    config = CapacityConfig(capacity=3, min_capacity=4)
    assert config.slots(10, 4, 2) == 4 and CapacityConfig(capacity_factor=1.5).slots(10, 4, 2) == 8


def test_same_formula_as_expert_choice():
    for T in (1, 3, 7, 64):
        for E, k in ((4, 1), (8, 2), (3, 2)):
            for cf in (0.3, 1.0, 1.25, 2.0):
                assert expert_capacity(T, E, k, capacity_factor=cf) == expert_choice_capacity(T, E, k, cf)
                assert expert_capacity(T, E, k, capacity_factor=cf) == min(T, math.ceil(round(cf * T * k / E, 9)))


@pytest.mark.parametrize("kw,error,match", [
    (dict(), ValueError, "exactly one of capacity_factor and capacity"),
    (dict(capacity_factor=1.0, capacity=2), ValueError, "exactly one"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor must be > 0"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor must be finite"),
    (dict(capacity=0), ValueError, "capacity must be >= 1"),
    (dict(capacity=2, min_capacity=-1), ValueError, "min_capacity must be >= 0"),
])
def test_formula_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        expert_capacity(10, 4, 2, **kw)


# --- who is dropped, on a routing written by hand ----------------------------------------------------------

# 4 tokens, 3 experts, k = 2, capacity 2. Expert 0 is wanted by t0 (1st choice), t1 (2nd), t2 (1st), t3 (1st);
# expert 1 by t0 (2nd), t1 (1st), t3 (2nd); expert 2 by t2 (2nd). Top scores: t0 .5, t1 .6, t2 .9, t3 .7.
EXPERTS = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]])
SCORES = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [0.05, 0.05, 0.9], [0.7, 0.2, 0.1]])
F_, T_ = False, True
HAND = {
    # position: expert 0 serves t0, t1 and is full (drops t2, t3); expert 1 serves t0, t1 (drops t3)
    "position": [[F_, F_], [F_, F_], [T_, F_], [T_, T_]],
    # choice: expert 0 serves the first choices t0, t2 (drops t3's 1st, then t1's 2nd); expert 1 serves t1
    # (1st) then t0 (2nd), drops t3 (2nd)
    "choice": [[F_, F_], [F_, T_], [F_, F_], [T_, T_]],
    # score: tokens in order t2, t3, t1, t0, first choices first. Expert 0: t2, t3 (drops t0's 1st, t1's 2nd);
    # expert 1: t1 (1st), then t3 (2nd), drops t0 (2nd)
    "score": [[T_, T_], [F_, T_], [F_, F_], [F_, F_]],
}


def hand_routing():
    weights = SCORES.gather(1, EXPERTS)
    logits = SCORES.log()
    return Routing(EXPERTS, weights, logits, SCORES, SCORES, torch.bincount(EXPERTS.reshape(-1), minlength=3))


@pytest.mark.parametrize("priority", list(HAND))
def test_drop_priority_by_hand(priority):
    routing = hand_routing()
    weights = routing.combine_weights.clone()
    record = apply_capacity(routing, 2, group_size=4, drop_priority=priority)
    assert isinstance(record, CapacityRecord) and record.capacity == 2 and record.group_size == 4
    expected = torch.tensor(HAND[priority])
    assert record.dropped.tolist() == expected.tolist()
    assert record.keep.tolist() == (~expected).tolist()
    assert record.num_dropped == int(expected.sum()) and record.drop_rate == expected.sum().item() / 8
    assert record.dropped_per_expert(3, EXPERTS).tolist() == [2, 1, 0]
    assert torch.bincount(EXPERTS[record.keep], minlength=3).tolist() == [2, 2, 1]
    assert torch.all(record.positions[expected] == -1)
    assert sorted(record.positions[~expected].tolist()) == [0, 0, 0, 1, 1]  # each kept pair has its own slot
    # the routing is left as the router made it: the demand, and the (not renormalised) weights
    assert routing.mask is None and routing.tokens_per_expert.tolist() == [4, 3, 1]
    assert torch.equal(routing.combine_weights, weights)


def brute_force_positions(expert_indices, group_size, priority, scores):
    """Mesh-TensorFlow's way, one pair at a time: each expert's counter per group, pairs in priority order."""
    T, k = expert_indices.shape
    positions = torch.full((T, k), -1)
    for g in range(T // group_size):
        tokens = list(range(g * group_size, (g + 1) * group_size))
        if priority == "score":
            top = {t: max(scores[t, e].item() for e in expert_indices[t]) for t in tokens}
            tokens = sorted(tokens, key=lambda t: -top[t])  # stable: ties keep position order
        if priority == "position":
            pairs = [(t, j) for t in tokens for j in range(k)]
        else:
            pairs = [(t, j) for j in range(k) for t in tokens]
        counters = {}
        for t, j in pairs:
            e = int(expert_indices[t, j])
            positions[t, j] = counters.get(e, 0)
            counters[e] = positions[t, j].item() + 1
    return positions


@pytest.mark.parametrize("priority", ["position", "choice", "score"])
@pytest.mark.parametrize("group_size", [12, 4])
def test_queue_positions_match_brute_force(priority, group_size):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(12, 5, generator=g).softmax(-1)
    expert_indices = scores.topk(3, dim=-1).indices
    positions = queue_positions(expert_indices, 5, group_size=group_size, drop_priority=priority, scores=scores)
    assert positions.tolist() == brute_force_positions(expert_indices, group_size, priority, scores).tolist()


@pytest.mark.parametrize("priority", ["position", "choice", "score"])
def test_padding_takes_no_place(priority):
    # the positions with padding tokens are those of the real tokens alone, padding gets -1
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(12, 5, generator=g).softmax(-1)
    expert_indices = scores.topk(2, dim=-1).indices
    real = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    mask = real.unsqueeze(1).expand(12, 2)
    positions = queue_positions(expert_indices, 5, group_size=12, drop_priority=priority, scores=scores, mask=mask)
    alone = brute_force_positions(expert_indices[real], int(real.sum()), priority, scores[real])
    assert positions[real].tolist() == alone.tolist() and torch.all(positions[~real] == -1)
    routing = Routing(expert_indices, scores.gather(1, expert_indices), scores.log(), scores, scores,
                      torch.bincount(expert_indices[mask], minlength=5), mask=mask)
    record = apply_capacity(routing, 1, group_size=12, drop_priority=priority)
    assert not record.keep[~real].any() and not record.dropped[~real].any()  # padding is neither kept nor dropped
    assert int(record.keep.sum()) + record.num_dropped == 2 * int(real.sum())


# --- in the MoE layer ----------------------------------------------------------------------------------------


def make(**kw):
    torch.manual_seed(0)
    return MoE(16, 24, 4, 2, **kw)


def v0_dropless(moe, x):
    """The dropless forward as it was before capacities existed: route, sort, permute, 3 grouped matmuls, combine."""
    x_flat = x.reshape(-1, 16)
    plan = sort_by_expert(moe.router(x_flat))
    assert plan.slots == 2 and plan.offsets[-1] == plan.token_ids.numel() == x_flat.shape[0] * 2
    x_sorted = permute(x_flat, plan)
    e = moe.experts
    hidden = e.act(grouped_mm(x_sorted, e.w_in, plan.offsets)) * grouped_mm(x_sorted, e.w_up, plan.offsets)
    y_sorted = grouped_mm(hidden, e.w_out, plan.offsets)
    weighted = y_sorted * plan.combine_weights.unsqueeze(-1)
    return torch.zeros_like(x_flat).index_add(0, plan.token_ids, weighted).reshape(x.shape)


def test_dropless_default_is_bit_identical():
    moe = make()
    x = torch.randn(3, 8, 16)
    y = moe(x)
    assert moe.capacity_config is None and moe.last_capacity is None and moe.last_routing.mask is None
    assert moe.num_dropped == 0 and moe.drop_rate == 0.0 and moe.tokens_dropped == 0
    assert torch.equal(y, v0_dropless(moe, x))
    roomy = make(capacity=CapacityConfig(capacity_factor=4 / 2))  # C = S: nothing can be dropped
    y_roomy = roomy(x)
    assert roomy.capacity_config is not None and roomy.num_dropped == 0 and roomy.last_capacity.capacity == 8
    assert bool(roomy.last_capacity.keep.all())
    assert torch.equal(y_roomy, y)


def float64_reference(moe, x):
    """Float64, differentiable, one (token, slot) pair at a time: softmax router, recorded choices, dropped pairs
    zeroed by hand. For ``norm_topk_prob=False``: a kept pair's weight is its probability."""
    r, c, e = moe.last_routing, moe.last_capacity, moe.experts
    x64 = x.reshape(-1, moe.d_model).double()
    probs = torch.softmax(x64 @ moe.router.gate.weight.double().t(), dim=-1)
    rows = []
    for t in range(x64.shape[0]):
        acc = torch.zeros(moe.d_model, dtype=torch.float64)
        for j in range(r.slots):
            if c.dropped[t, j]:
                continue
            i = int(r.expert_indices[t, j])
            h = e.act(x64[t] @ e.w_in[i].double()) * (x64[t] @ e.w_up[i].double())
            acc = acc + probs[t, i] * (h @ e.w_out[i].double())
        rows.append(acc)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("priority", ["position", "choice", "score"])
@pytest.mark.parametrize("impl", ["grouped", "naive", "einsum", "padded"])
def test_dropped_pairs_contribute_zero(priority, impl):
    moe = make(capacity=CapacityConfig(capacity_factor=0.5, drop_priority=priority), impl=impl,
               router=RouterConfig(norm_topk_prob=False))
    x = torch.randn(2, 12, 16)
    y = moe(x)
    r, c = moe.last_routing, moe.last_capacity
    assert c.capacity == 3 and moe.num_dropped > 0 and moe.tokens_dropped > 0
    assert moe.num_dropped == int(c.dropped.sum()) and moe.drop_rate == pytest.approx(moe.num_dropped / 48)
    assert moe.tokens_dropped == int(c.dropped.all(1).sum())
    assert_every_drop_counted(moe)
    per_group = torch.zeros(2, 4, dtype=torch.int64)  # kept pairs of each expert in each sequence
    for t, j in zip(*torch.nonzero(c.keep, as_tuple=True)):
        per_group[t // 12, r.expert_indices[t, j]] += 1
    assert per_group.max() <= 3
    with torch.no_grad():
        torch.testing.assert_close(y.double(), float64_reference(moe, x), atol=1e-5, rtol=1e-5)
    close64(y, reference_output(moe, x), torch.float32)
    fully_dropped = c.dropped.all(1).reshape(2, 12)
    assert torch.all(y[fully_dropped] == 0)  # exactly zero: the residual stream carries these tokens


@pytest.mark.parametrize("impl", ["grouped", "einsum"])
def test_capacity_backward_matches_float64_reference(impl):
    moe = make(capacity=CapacityConfig(capacity_factor=0.75), router=RouterConfig(norm_topk_prob=False), impl=impl,
               aux_losses=AuxLossConfig(balance_coef=0.0)).double()
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert moe.num_dropped > 0
    g = torch.randn_like(y)
    params = [moe.router.gate.weight, moe.experts.w_in, moe.experts.w_up, moe.experts.w_out]
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(float64_reference(moe, x), [x, *params], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    dropped_experts = moe.last_routing.expert_indices[moe.last_capacity.dropped]
    assert dropped_experts.numel() > 0


def two_sequences():
    """Sequence 0 sends all its tokens to expert 0, sequence 1 all to expert 1 (E = 2, k = 1)."""
    moe = MoE(2, 4, 2, 1, capacity=CapacityConfig(capacity_factor=1.0, group="sequence"))
    with torch.no_grad():
        moe.router.gate.weight.copy_(5 * torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat_interleave(4, 0).reshape(2, 4, 2)
    return moe, x


def test_sequence_and_batch_groups_drop_differently():
    moe, x = two_sequences()
    moe(x)  # per sequence: C = ceil(4 * 1 / 2) = 2, and each sequence sends 4 tokens to one expert
    c = moe.last_capacity
    assert (c.capacity, c.group_size) == (2, 4) and moe.num_dropped == 4 and moe.tokens_dropped == 4
    assert c.dropped[:, 0].tolist() == [False, False, True, True] * 2  # position order
    moe.capacity_config = dataclasses.replace(moe.capacity_config, group="batch")
    moe(x)  # over the batch: C = ceil(8 / 2) = 4, and each expert gets exactly 4
    assert (moe.last_capacity.capacity, moe.last_capacity.group_size) == (4, 8) and moe.num_dropped == 0
    moe.capacity_config = dataclasses.replace(moe.capacity_config, group="sequence")
    moe(x.reshape(8, 2))  # a [T, d] input is one sequence: both groupings agree
    assert moe.last_capacity.group_size == 8 and moe.num_dropped == 0


def test_score_priority_keeps_the_most_confident_tokens():
    moe = MoE(2, 4, 2, 1, capacity=CapacityConfig(capacity=2, drop_priority="score"))
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[[0.5, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])  # all to expert 0, growing confidence
    moe(x)
    assert moe.last_capacity.dropped[:, 0].tolist() == [True, False, True, False]  # keeps t1 (3.0) and t3 (2.0)
    moe.capacity_config = dataclasses.replace(moe.capacity_config, drop_priority="position")
    moe(x)
    assert moe.last_capacity.dropped[:, 0].tolist() == [False, False, True, True]


@pytest.mark.parametrize("router", [RouterConfig(), RouterConfig("noisy"),
                                    RouterConfig("sigmoid", n_group=2, topk_group=1)])
def test_token_choice_routers_with_capacity(router):
    moe = make(router=router, capacity=CapacityConfig(capacity_factor=0.5, min_capacity=2),
               aux_losses=AuxLossConfig(compute_all=True))
    x = torch.randn(2, 6, 16)
    y = moe(x)
    assert moe.last_capacity.capacity == 2 and y.shape == x.shape and moe.num_dropped > 0
    assert set(moe.losses) == {"balance", "seq_balance", "z"}
    # the balance loss sees the router's choices, dropped pairs included
    r = moe.last_routing
    torch.testing.assert_close(moe.losses["balance"], load_balancing_loss(r.router_probs, r.expert_indices))
    assert "capacity_factor=0.5" in repr(moe)
    close64(y, reference_output(moe, x), torch.float32)


def test_expert_choice_unchanged():
    moe = make(router=RouterConfig("expert_choice", capacity_factor=1.25))
    moe(torch.randn(12, 16))
    C = expert_choice_capacity(12, 4, 2, 1.25)
    assert moe.tokens_per_expert.tolist() == [C] * 4 and moe.num_dropped == 0 and moe.last_capacity is None
    assert make(router="expert_choice").router.capacity_factor == 1.0


def test_empty_input_with_capacity():
    moe = make(capacity=CapacityConfig(capacity_factor=1.0))
    y = moe(torch.randn(2, 0, 16))
    assert y.shape == (2, 0, 16) and moe.num_dropped == 0 and moe.drop_rate == 0.0


def test_before_any_forward():
    moe = make(capacity=CapacityConfig(capacity=2))
    assert moe.num_dropped is None and moe.drop_rate is None and moe.tokens_dropped is None


@pytest.mark.parametrize("kw,error,match", [
    (dict(capacity_factor=0.0), ValueError, "capacity_factor must be > 0"),
    (dict(capacity_factor=-1.0), ValueError, "capacity_factor must be > 0"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor must be finite"),
    (dict(capacity_factor=float("inf")), ValueError, "capacity_factor must be finite"),
    (dict(capacity_factor="1.0"), TypeError, "capacity_factor must be a real number"),
    (dict(capacity=0), ValueError, "capacity must be >= 1"),
    (dict(capacity=2.5), TypeError, "capacity must be an int"),
    (dict(capacity=True), TypeError, "capacity must be an int"),
    (dict(capacity=2, capacity_factor=1.0), ValueError, "exactly one of capacity_factor and capacity"),
    (dict(), ValueError, "exactly one of capacity_factor and capacity"),
    (dict(capacity=2, min_capacity=-1), ValueError, "min_capacity must be >= 0"),
    (dict(capacity_factor=1.0, drop_priority="random"), ValueError, "drop_priority must be one of"),
    (dict(capacity_factor=1.0, group="device"), ValueError, "group must be one of"),
])
def test_bad_capacity_config(kw, error, match):
    with pytest.raises(error, match=match):
        CapacityConfig(**kw)


@pytest.mark.parametrize("kw,error,match", [
    (lambda: dict(capacity=3), TypeError, "capacity must be a CapacityConfig or None"),
    (lambda: dict(router=RouterConfig("expert_choice"), capacity=CapacityConfig(capacity=3)), ValueError,
     "capacity applies to token-choice routers"),
    (lambda: dict(router=RouterConfig("expert_choice", capacity_factor=0.0)), ValueError,
     "capacity_factor must be > 0"),
    (lambda: dict(router=RouterConfig(capacity_factor=1.5)), ValueError,
     "capacity_factor applies only to router kinds"),
])
def test_bad_capacity_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        MoE(16, 24, 4, 2, **kw())


def test_apply_capacity_bad_arguments():
    with pytest.raises(TypeError, match="routing must be a Routing"):
        apply_capacity(EXPERTS, 2, group_size=4)
    with pytest.raises(ValueError, match="group_size must divide the number of tokens T=4"):
        apply_capacity(hand_routing(), 2, group_size=3)
    with pytest.raises(ValueError, match="drop_priority must be one of"):
        apply_capacity(hand_routing(), 2, group_size=4, drop_priority="random")
