"""Routing rules (:mod:`moe_ref.routing`): pure functions from logits to a :class:`Routing`, on hand-computed cases.

The router modules that hold the gate weights are tested in ``test_routers.py``.
"""

import math

import pytest
import torch

from moe_ref.routing import (Routing, expert_choice, expert_choice_capacity, noisy_logits, sigmoid_grouped_topk,
                             softmax_topk)

# 3 tokens x 4 experts; logits = log(p), so softmax(logits) = p exactly (each row of p sums to 1)
P = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                  [0.10, 0.60, 0.10, 0.20],
                  [0.25, 0.05, 0.30, 0.40]])
LOGITS = P.log()


def test_softmax_top2_renormalised_by_hand():  # GShard / Mixtral
    r = softmax_topk(LOGITS, 2, norm_topk_prob=True)
    assert r.expert_indices.tolist() == [[0, 1], [1, 3], [3, 2]]
    assert r.expert_indices.dtype == torch.int64
    torch.testing.assert_close(r.combine_weights, torch.tensor([[4 / 7, 3 / 7], [0.75, 0.25], [4 / 7, 3 / 7]]))
    assert r.tokens_per_expert.tolist() == [1, 2, 1, 2]
    torch.testing.assert_close(r.router_scores, P)
    torch.testing.assert_close(r.router_probs, P)
    assert r.mask is None and r.slots == 2 and (r.num_tokens, r.num_experts) == (3, 4)


def test_softmax_top2_raw_by_hand():  # Qwen-MoE / OLMoE with norm_topk_prob=False
    r = softmax_topk(LOGITS, 2, norm_topk_prob=False)
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.4, 0.3], [0.6, 0.2], [0.4, 0.3]]))


def test_switch_top1_raw_probability():
    r = softmax_topk(LOGITS, 1, norm_topk_prob=False)
    assert r.expert_indices.tolist() == [[0], [1], [3]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.4], [0.6], [0.4]]))


def test_rules_compute_in_float32_for_16_bit_logits():
    for dtype in (torch.bfloat16, torch.float16):
        r = softmax_topk(LOGITS.to(dtype), 2, norm_topk_prob=True)
        assert r.router_logits.dtype == torch.float32 and r.combine_weights.dtype == torch.float32
        r = sigmoid_grouped_topk(LOGITS.to(dtype), 2)
        assert r.router_scores.dtype == torch.float32 and r.combine_weights.dtype == torch.float32
    assert softmax_topk(LOGITS.double(), 2, norm_topk_prob=True).combine_weights.dtype == torch.float64


def logit(s):
    s = torch.tensor(s, dtype=torch.float64)
    return (s / (1 - s)).log().float()


# one token, 8 experts in 4 groups of 2
S = [0.9, 0.1, 0.6, 0.5, 0.8, 0.7, 0.2, 0.3]


def test_sigmoid_group_limited_by_hand():
    # group scores (sum of top-2): g0 = 1.0, g1 = 1.1, g2 = 1.5, g3 = 0.5 -> keep g2, g1 -> experts 2..5;
    # expert 0 has the highest score but its group is dropped; top-2 eligible: 4 (0.8) and 5 (0.7)
    r = sigmoid_grouped_topk(logit([S]), 2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    assert sorted(r.expert_indices[0].tolist()) == [4, 5]
    weights = dict(zip(r.expert_indices[0].tolist(), r.combine_weights[0].tolist()))
    assert weights[4] == pytest.approx(0.8 / 1.5 * 2.5) and weights[5] == pytest.approx(0.7 / 1.5 * 2.5)
    torch.testing.assert_close(r.router_scores, torch.tensor([S]))
    torch.testing.assert_close(r.router_probs, torch.tensor([S]) / sum(S))
    # without groups: plain top-2 of the scores
    r = sigmoid_grouped_topk(logit([S]), 2, n_group=1, topk_group=1)
    assert sorted(r.expert_indices[0].tolist()) == [0, 4]


def test_sigmoid_bias_changes_selection_not_weights():
    bias = torch.tensor([0, 0, 0.5, 0, 0, 0, 0, 0])
    # biased: e2 = 1.1, so g1 = 1.6 and g2 = 1.5 are kept; top-2 of (1.1, 0.5, 0.8, 0.7) -> experts 2, 4
    r = sigmoid_grouped_topk(logit([S]), 2, expert_bias=bias, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    weights = dict(zip(r.expert_indices[0].tolist(), r.combine_weights[0].tolist()))
    assert sorted(weights) == [2, 4]
    assert weights[2] == pytest.approx(0.6 / 1.4 * 2.5) and weights[4] == pytest.approx(0.8 / 1.4 * 2.5)
    r = sigmoid_grouped_topk(logit([S]), 2, expert_bias=bias, norm_topk_prob=False)
    assert sorted(r.combine_weights[0].tolist()) == pytest.approx([0.6, 0.9])  # unbiased scores of 2 and 0
    # the scores (and so the balance losses) do not see the bias either
    torch.testing.assert_close(r.router_scores, torch.tensor([S]))


def test_expert_choice_by_hand():
    # 3 tokens x 3 experts, capacity 1: expert 0's best token is t0 (0.45), expert 1's is t0 (0.45),
    # expert 2's is t1 (0.60). Token 0 gets two experts, token 2 none.
    probs = torch.tensor([[0.45, 0.45, 0.10], [0.30, 0.10, 0.60], [0.10, 0.35, 0.55]])
    assert expert_choice_capacity(3, 3, 1, 1.0) == 1
    r = expert_choice(probs.log(), 1)
    assert r.mask.tolist() == [[True, True, False], [False, False, True], [False, False, False]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.45, 0.45, 0], [0, 0, 0.6], [0, 0, 0]]))
    assert r.expert_indices.tolist() == [[0, 1, 2]] * 3 and r.slots == 3
    assert r.tokens_per_expert.tolist() == [1, 1, 1]
    pair_ids, token_ids, expert_ids, weights = r.assignments()
    assert pair_ids.tolist() == [0, 1, 5]  # t * slots + j
    assert token_ids.tolist() == [0, 0, 1] and expert_ids.tolist() == [0, 1, 2]
    torch.testing.assert_close(weights, torch.tensor([0.45, 0.45, 0.6]))


def test_expert_choice_never_takes_padding():
    # token 0 is every expert's favourite but is padding: each expert takes its best real token instead
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.30, 0.10, 0.60], [0.10, 0.35, 0.55]])
    r = expert_choice(probs.log(), 1, token_mask=torch.tensor([False, True, True]))
    assert r.mask.tolist() == [[False, False, False], [True, False, True], [False, True, False]]
    assert r.tokens_per_expert.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="capacity must be <= the number of real tokens 2"):
        expert_choice(probs.log(), 3, token_mask=torch.tensor([False, True, True]))


@pytest.mark.parametrize("T,E,k,cf,expected", [
    (8, 4, 2, 1.0, 4), (10, 4, 1, 1.1, 3), (10, 3, 1, 1.0, 4), (4, 2, 2, 3.0, 4), (10, 5, 1, 1.1, 3), (2, 8, 1, 1.0, 1),
    (0, 4, 2, 1.0, 0),
])
def test_expert_choice_capacity_formula(T, E, k, cf, expected):
    assert expert_choice_capacity(T, E, k, cf) == expected


def test_assignments_and_token_mask():
    r = softmax_topk(LOGITS, 2, norm_topk_prob=True)
    pair_ids, token_ids, expert_ids, weights = r.assignments()
    assert pair_ids.tolist() == list(range(6)) and token_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert expert_ids.tolist() == [0, 1, 1, 3, 3, 2]
    masked = r.with_token_mask(torch.tensor([True, False, True]))
    assert masked.mask.tolist() == [[True, True], [False, False], [True, True]]
    assert masked.tokens_per_expert.tolist() == [1, 1, 1, 1]  # token 1's experts 1 and 3 lose one each
    assert masked.combine_weights[1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(masked.combine_weights[[0, 2]], r.combine_weights[[0, 2]])
    pair_ids, token_ids, expert_ids, _ = masked.assignments()
    assert pair_ids.tolist() == [0, 1, 4, 5] and token_ids.tolist() == [0, 0, 2, 2]
    assert r.with_token_mask(None) is r and r.mask is None  # the original is unchanged


def test_detach():
    logits = LOGITS.clone().requires_grad_()
    r = softmax_topk(logits, 2, norm_topk_prob=True)
    assert r.combine_weights.requires_grad
    d = r.detach()
    assert isinstance(d, Routing)
    assert not any(t.requires_grad for t in (d.combine_weights, d.router_logits, d.router_scores, d.router_probs))
    torch.testing.assert_close(d.combine_weights, r.combine_weights.detach())
    assert d.mask is None and torch.equal(d.expert_indices, r.expert_indices)


def test_noisy_logits_scale():
    torch.manual_seed(0)
    clean = torch.zeros(20000, 2)
    noise_logits = torch.tensor([0.0, 2.0]).expand(20000, 2)
    h = noisy_logits(clean, noise_logits)
    # H = clean + N(0, 1) * softplus(noise_logits): standard deviations softplus(0) = log 2, softplus(2)
    std = h.std(dim=0)
    assert std[0].item() == pytest.approx(math.log(2), rel=0.03)
    assert std[1].item() == pytest.approx(math.log1p(math.exp(2.0)), rel=0.03)


@pytest.mark.parametrize("norm", [True, False])
def test_gradcheck_softmax_topk_weights(norm):
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: softmax_topk(l, 3, norm_topk_prob=norm).combine_weights, (logits,))


def test_gradcheck_sigmoid_weights():
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda l: sigmoid_grouped_topk(l, 2, n_group=4, topk_group=2, routed_scaling_factor=2.5).combine_weights,
        (logits,))


def test_bad_logits():
    with pytest.raises(ValueError, match="k must be <= the number of experts E=4"):
        softmax_topk(LOGITS, 5, norm_topk_prob=True)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        softmax_topk(LOGITS.long(), 1, norm_topk_prob=True)
    with pytest.raises(ValueError, match=r"logits must be \[T, E\]"):
        softmax_topk(LOGITS[None], 1, norm_topk_prob=True)
    with pytest.raises(ValueError, match="capacity must be <="):
        expert_choice(LOGITS, 4)
    with pytest.raises(ValueError, match="n_group must divide"):
        sigmoid_grouped_topk(logit([S]), 2, n_group=3)
