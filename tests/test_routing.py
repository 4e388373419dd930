import math

import pytest
import torch

from moe_ref.routing import (ExpertChoiceRouter, NoisyTopKRouter, SigmoidRouter, TopKRouter, expert_choice,
                             expert_choice_capacity, make_router, sigmoid_grouped_topk, softmax_topk)

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
    assert r.router_probs is r.router_scores and r.mask is None


def test_softmax_top2_raw_by_hand():  # Qwen-MoE / OLMoE with norm_topk_prob=False
    r = softmax_topk(LOGITS, 2, norm_topk_prob=False)
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.4, 0.3], [0.6, 0.2], [0.4, 0.3]]))


def test_switch_top1_raw_probability():
    r = softmax_topk(LOGITS, 1, norm_topk_prob=False)
    assert r.expert_indices.tolist() == [[0], [1], [3]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.4], [0.6], [0.4]]))
    # the default of TopKRouter: raw for k=1, renormalised for k>1
    assert TopKRouter(4, 4, 1).norm_topk_prob is False and TopKRouter(4, 4, 2).norm_topk_prob is True


def test_router_math_in_float32_for_bfloat16_input():
    router = TopKRouter(8, 4, 2).bfloat16()
    r = router(torch.randn(5, 8).bfloat16())
    assert r.router_logits.dtype == torch.float32 and r.combine_weights.dtype == torch.float32


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


def test_sigmoid_group_arguments_checked():
    with pytest.raises(ValueError, match="n_group must divide"):
        SigmoidRouter(8, 8, 2, n_group=3)
    with pytest.raises(ValueError, match="topk_group must be <="):
        SigmoidRouter(8, 8, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="k=4 exceeds"):
        SigmoidRouter(8, 8, 4, n_group=4, topk_group=1)


def test_expert_choice_by_hand():
    # 3 tokens x 3 experts, capacity 1: expert 0's best token is t0 (0.45), expert 1's is t0 (0.45),
    # expert 2's is t1 (0.60). Token 0 gets two experts, token 2 none.
    probs = torch.tensor([[0.45, 0.45, 0.10], [0.30, 0.10, 0.60], [0.10, 0.35, 0.55]])
    assert expert_choice_capacity(3, 3, 1, 1.0) == 1
    r = expert_choice(probs.log(), 1)
    assert r.mask.tolist() == [[True, True, False], [False, False, True], [False, False, False]]
    torch.testing.assert_close(r.combine_weights, torch.tensor([[0.45, 0.45, 0], [0, 0, 0.6], [0, 0, 0]]))
    assert r.expert_indices.tolist() == [[0, 1, 2]] * 3 and r.k == 3 and r.capacity == 1
    assert r.tokens_per_expert.tolist() == [1, 1, 1]
    token_ids, expert_ids, weights = r.assignments()
    assert token_ids.tolist() == [0, 0, 1] and expert_ids.tolist() == [0, 1, 2]


@pytest.mark.parametrize("T,E,k,cf,expected", [
    (8, 4, 2, 1.0, 4), (10, 4, 1, 1.1, 3), (10, 3, 1, 1.0, 4), (4, 2, 2, 3.0, 4), (10, 5, 1, 1.1, 3), (2, 8, 1, 1.0, 1),
])
def test_expert_choice_capacity_formula(T, E, k, cf, expected):
    assert expert_choice_capacity(T, E, k, cf) == expected == max(1, min(T, math.ceil(round(cf * T * k / E, 9))))


def test_expert_choice_router_balanced():
    router = ExpertChoiceRouter(8, 4, 2, capacity_factor=1.0)
    r = router(torch.randn(12, 8))
    assert r.capacity == 6 and r.tokens_per_expert.tolist() == [6] * 4 and int(r.mask.sum()) == 24


def test_noisy_router_noise_only_in_training():
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 4, 2)
    x = torch.randn(4000, 8)
    clean = TopKRouter(8, 4, 2)
    clean.gate.weight.data.copy_(router.gate.weight)
    router.eval()
    r_eval = router(x)
    torch.testing.assert_close(r_eval.combine_weights, clean(x).combine_weights)
    router.train()
    r_train = router(x)
    noise = r_train.router_logits - r_eval.router_logits
    # w_noise starts at 0: noise ~ N(0, softplus(0)^2) = N(0, log(2)^2)
    assert noise.std().item() == pytest.approx(math.log(2), rel=0.05)
    # the weights are a softmax over the kept noisy logits
    kept = r_train.router_logits.gather(1, r_train.expert_indices)
    torch.testing.assert_close(r_train.combine_weights, kept.softmax(-1))
    r_train.combine_weights[:, 0].sum().backward()  # (each row sums to 1, so backprop one slot)
    assert router.w_noise.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", [True, False])
def test_gradcheck_softmax_topk_weights(norm):
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: softmax_topk(l, 3, norm_topk_prob=norm).combine_weights, (logits,))


def test_gradcheck_sigmoid_weights_and_router_module():
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda l: sigmoid_grouped_topk(l, 2, n_group=4, topk_group=2, routed_scaling_factor=2.5).combine_weights,
        (logits,))
    router = TopKRouter(4, 6, 2).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert router(x).combine_weights.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: router(x).combine_weights, (x,))


def test_bias_update_moves_load_towards_balance():
    torch.manual_seed(0)
    router = SigmoidRouter(16, 8, 2, bias_update_rate=0.02)
    x = torch.randn(512, 16) + 1.0
    with torch.no_grad():
        router.gate.weight[0] = 0.5  # expert 0 wins for almost every token
    router.train()

    def imbalance():
        load = router(x).tokens_per_expert.float()
        return (load.max() / load.mean()).item()

    first = imbalance()
    load = router.load_since_update.clone().float()
    router.after_optimizer_step()
    torch.testing.assert_close(router.expert_bias, 0.02 * torch.sign(load.mean() - load))
    assert router.load_since_update.sum() == 0
    for _ in range(60):
        imbalance()
        router.after_optimizer_step()
    last = imbalance()
    assert first > 3.0 and last < first / 2
    assert router.expert_bias[0] < 0
    # an eval-mode forward does not count towards the next update
    router.update_bias()
    router.eval()
    router(x)
    assert router.load_since_update.sum() == 0


def test_bias_stays_float32_under_bfloat16_cast():
    router = SigmoidRouter(8, 4, 2).to(torch.bfloat16)
    assert router.expert_bias.dtype == torch.float32 and router.gate.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("k,E,error,match", [
    (5, 4, ValueError, "k must be <= num_experts=4"),
    (0, 4, ValueError, "k must be >= 1"),
    (2, 0, ValueError, "num_experts must be >= 1"),
    (2.0, 4, TypeError, "k must be an int"),
])
def test_router_bad_arguments(k, E, error, match):
    with pytest.raises(error, match=match):
        TopKRouter(8, E, k)


def test_bad_logits_and_router_name():
    with pytest.raises(ValueError, match="k must be <= the number of experts E=4"):
        softmax_topk(LOGITS, 5, norm_topk_prob=True)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        softmax_topk(LOGITS.long(), 1, norm_topk_prob=True)
    with pytest.raises(ValueError, match="capacity must be <="):
        expert_choice(LOGITS, 4)
    with pytest.raises(ValueError, match="router must be one of"):
        make_router("hash", 8, 4, 2)
