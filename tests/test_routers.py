"""Router modules (:mod:`moe_ref.routers`): the gate, the rule each applies, noise, jitter, the DeepSeek-V3 bias
update, precision and argument checks. The rules themselves are tested by hand in ``test_routing.py``."""

import math

import pytest
import torch

from moe_ref.routers import (ROUTERS, ExpertChoiceRouter, NoisyTopKRouter, RouterConfig, SigmoidRouter, TopKRouter,
                             make_router)
from moe_ref.routing import expert_choice_capacity, sigmoid_grouped_topk, softmax_topk


def test_topk_router_applies_softmax_topk_to_its_logits():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2)
    x = torch.randn(6, 8)
    r = router(x)
    expected = softmax_topk(x @ router.gate.weight.t(), 2, norm_topk_prob=True)
    assert torch.equal(r.expert_indices, expected.expert_indices)
    torch.testing.assert_close(r.combine_weights, expected.combine_weights)
    # the default: raw weights for k=1 (Switch), renormalised for k>1 (GShard, Mixtral)
    assert TopKRouter(4, 4, 1).norm_topk_prob is False and TopKRouter(4, 4, 2).norm_topk_prob is True
    assert TopKRouter(4, 4, 2, norm_topk_prob=False).norm_topk_prob is False


def test_token_mask_removes_padding():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2)
    x = torch.randn(5, 8)
    mask = torch.tensor([True, False, True, True, False])
    r = router(x, mask)
    assert r.mask.tolist() == [[m, m] for m in mask.tolist()]
    assert int(r.tokens_per_expert.sum()) == 6
    assert torch.all(r.combine_weights[~mask] == 0)


def test_router_params_stay_float32_under_16_bit_casts():
    router = TopKRouter(8, 4, 2).bfloat16()
    assert router.gate.weight.dtype == torch.float32
    r = router(torch.randn(5, 8).bfloat16())
    assert r.router_logits.dtype == torch.float32 and r.combine_weights.dtype == torch.float32
    sigmoid = SigmoidRouter(8, 4, 2).half()
    assert sigmoid.expert_bias.dtype == torch.float32 and sigmoid.gate.weight.dtype == torch.float32
    assert NoisyTopKRouter(8, 4, 2).to(torch.bfloat16).w_noise.dtype == torch.float32
    # float64 is not lowered, so it is applied
    assert TopKRouter(8, 4, 2).double().gate.weight.dtype == torch.float64


def test_sigmoid_router_applies_its_options():
    torch.manual_seed(0)
    router = SigmoidRouter(8, 8, 2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(6, 8)
    r = router(x)
    expected = sigmoid_grouped_topk(x @ router.gate.weight.t(), 2, expert_bias=router.expert_bias, n_group=4,
                                    topk_group=2, routed_scaling_factor=2.5)
    assert torch.equal(r.expert_indices, expected.expert_indices)
    torch.testing.assert_close(r.combine_weights, expected.combine_weights)


def test_expert_choice_router_balanced():
    router = ExpertChoiceRouter(8, 4, 2, capacity_factor=1.0)
    r = router(torch.randn(12, 8))
    assert r.tokens_per_expert.tolist() == [6] * 4 and int(r.mask.sum()) == 24
    # padding: the capacity counts only the real tokens, and padding is never taken
    mask = torch.tensor([True] * 8 + [False] * 4)
    r = router(torch.randn(12, 8), mask)
    C = expert_choice_capacity(8, 4, 2, 1.0)
    assert C == 4 and r.tokens_per_expert.tolist() == [C] * 4 and not r.mask[~mask].any()


def test_noisy_router_noise_only_in_training():
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 4, 2)
    assert router.w_noise.shape == (4, 8) and torch.all(router.w_noise == 0)
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
    # the noise scale is learned: w_noise gets a gradient through the kept logits
    (r_train.combine_weights[:, 0] * torch.randn(4000)).sum().backward()
    assert router.w_noise.grad is not None and router.w_noise.grad.abs().sum() > 0


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, jitter_noise=0.1)
    x = torch.randn(50, 8)
    router.eval()
    assert router.jitter(x) is x
    router.train()
    torch.manual_seed(3)
    ratio = router.jitter(x) / x
    torch.manual_seed(3)
    expected = torch.empty_like(x).uniform_(0.9, 1.1)
    torch.testing.assert_close(ratio, expected)
    assert TopKRouter(8, 4, 2).train().jitter(x) is x  # off by default


def test_gradcheck_router_module():
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

    def step():
        """A training step as the MoE layer does it: route, count the load, update after the optimizer."""
        load = router(x).tokens_per_expert
        router.record_load(load)
        return (load.max() / load.float().mean()).item()

    first = step()
    load = router.load_since_update.clone().float()
    router.update_bias()
    torch.testing.assert_close(router.expert_bias, 0.02 * torch.sign(load.mean() - load))
    assert router.load_since_update.sum() == 0
    for _ in range(60):
        step()
        router.update_bias()
    last = step()
    assert first > 3.0 and last < first / 2
    assert router.expert_bias[0] < 0


def test_bias_update_accumulates_and_resets():
    router = SigmoidRouter(4, 4, 1, bias_update_rate=0.5)
    router.record_load(torch.tensor([3, 0, 1, 0]))
    router.record_load(torch.tensor([1, 0, 1, 2]))
    assert router.load_since_update.tolist() == [4, 0, 2, 2]
    router.update_bias()  # mean 2: expert 0 over, expert 1 under, 2 and 3 at the mean
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0] and router.load_since_update.sum() == 0
    router.update_bias()  # no load counted: no change
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    off = SigmoidRouter(4, 4, 1, bias_update_rate=0.0)
    off.record_load(torch.tensor([3, 0, 1, 0]))
    off.update_bias()
    assert off.expert_bias.tolist() == [0.0] * 4 and off.load_since_update.sum() == 0


def test_load_since_update_is_saved():
    router = SigmoidRouter(4, 4, 1)
    router.record_load(torch.tensor([3, 0, 1, 0]))
    state = router.state_dict()
    assert state["load_since_update"].tolist() == [3, 0, 1, 0]
    restored = SigmoidRouter(4, 4, 1)
    restored.load_state_dict(state)
    assert restored.load_since_update.tolist() == [3, 0, 1, 0]


def test_make_router_reads_the_config():
    kinds = {kind: type(make_router(kind, 8, 4, 2)) for kind in ROUTERS}
    assert kinds == {"softmax": TopKRouter, "noisy": NoisyTopKRouter, "sigmoid": SigmoidRouter,
                     "expert_choice": ExpertChoiceRouter}
    r = make_router(RouterConfig(norm_topk_prob=False, jitter_noise=0.05), 8, 4, 2)
    assert type(r) is TopKRouter and r.norm_topk_prob is False and r.jitter_noise == 0.05
    assert type(make_router("noisy", 8, 4, 2)) is NoisyTopKRouter
    r = make_router(RouterConfig("sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5, bias_update_rate=0.0),
                    8, 4, 2)
    assert type(r) is SigmoidRouter and r.norm_topk_prob is True  # the sigmoid default
    assert (r.n_group, r.topk_group, r.routed_scaling_factor, r.bias_update_rate) == (2, 1, 2.5, 0.0)
    r = make_router(RouterConfig("expert_choice", capacity_factor=1.5), 8, 4, 2)
    assert type(r) is ExpertChoiceRouter and r.capacity_factor == 1.5
    assert RouterConfig.coerce("sigmoid") == RouterConfig(kind="sigmoid")


def test_sigmoid_group_arguments_checked():
    with pytest.raises(ValueError, match="n_group must divide"):
        SigmoidRouter(8, 8, 2, n_group=3)
    with pytest.raises(ValueError, match="topk_group must be <="):
        SigmoidRouter(8, 8, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="k=4 exceeds"):
        SigmoidRouter(8, 8, 4, n_group=4, topk_group=1)


@pytest.mark.parametrize("k,E,error,match", [
    (5, 4, ValueError, "k must be <= num_experts=4"),
    (0, 4, ValueError, "k must be >= 1"),
    (2, 0, ValueError, "num_experts must be >= 1"),
    (2.0, 4, TypeError, "k must be an int"),
])
def test_router_bad_arguments(k, E, error, match):
    with pytest.raises(error, match=match):
        TopKRouter(8, E, k)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        TopKRouter(8, 4, 2, False)


@pytest.mark.parametrize("kw,error,match", [
    (dict(kind="hash"), ValueError, "kind must be one of"),
    (dict(n_group=2), ValueError, "n_group applies only to router kinds"),
    (dict(kind="sigmoid", capacity_factor=2.0), ValueError, "capacity_factor applies only to router kinds"),
    (dict(kind="expert_choice", norm_topk_prob=True), ValueError, "norm_topk_prob applies only"),
    (dict(kind="expert_choice", capacity_factor=0.0), ValueError, "capacity_factor must be > 0"),
    (dict(jitter_noise=1.0), ValueError, "jitter_noise must be < 1"),
    (dict(jitter_noise=-0.1), ValueError, "jitter_noise must be >= 0"),
    (dict(norm_topk_prob=1), TypeError, "norm_topk_prob must be a bool"),
])
def test_router_config_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        RouterConfig(**kw)


def test_bad_router_name_and_type():
    with pytest.raises(ValueError, match="kind must be one of"):
        make_router("hash", 8, 4, 2)
    with pytest.raises(TypeError, match="router must be a RouterConfig"):
        make_router(3, 8, 4, 2)
    with pytest.raises(ValueError, match=r"x must be \[T, d_model\]"):
        TopKRouter(8, 4, 2)(torch.randn(2, 3, 8))


def test_softmax_router_with_bias_selects_with_it_and_weights_without_it():
    """Hand-computed: the bias holds expert 1 back; the weights are the unbiased probabilities."""
    router = make_router(RouterConfig("softmax", bias_update_rate=0.1), 4, 4, 2)
    assert type(router) is TopKRouter and router.has_bias and router.bias_update_rate == 0.1
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)  # [0.644, 0.237, 0.087, 0.032]
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 0.0]))
    routing = router.route(logits, None)
    assert routing.expert_indices.tolist() == [[0, 2]]
    torch.testing.assert_close(routing.combine_weights, probs[:, [0, 2]] / probs[:, [0, 2]].sum())
    torch.testing.assert_close(routing.router_probs, probs)  # the statistics see no bias either
    router.record_load(torch.tensor([5, 0, 1, 2]))
    router.update_bias()  # mean load 2: busy experts down, idle up, by the rate
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, -0.9, 0.1, 0.0]))


def test_softmax_router_bias_is_opt_in():
    plain = make_router("softmax", 4, 4, 2)
    assert not plain.has_bias and "expert_bias" not in plain.state_dict()
    plain.record_load(torch.tensor([4, 0, 0, 0]))
    plain.update_bias()  # no-ops without a bias
    biased = TopKRouter(4, 4, 2, bias_update_rate=0.01)
    assert set(biased.state_dict()) == {"gate.weight", "expert_bias", "load_since_update"}
    # a zero bias selects exactly as plain top-k does
    biased.load_state_dict({**plain.state_dict(), "expert_bias": torch.zeros(4),
                            "load_since_update": torch.zeros(4, dtype=torch.int64)})
    x = torch.randn(64, 4)
    a, b = plain(x), biased(x)
    assert torch.equal(a.expert_indices.sort(-1).values, b.expert_indices.sort(-1).values)
    torch.testing.assert_close(a.combine_weights.sort(-1).values, b.combine_weights.sort(-1).values)


def test_bias_update_rate_defaults_per_kind():
    assert make_router("sigmoid", 8, 4, 2).bias_update_rate == 1e-3  # DeepSeek-V3's step
    assert not make_router("softmax", 8, 4, 2).has_bias
    with pytest.raises(ValueError, match="bias_update_rate applies only to router kinds"):
        RouterConfig("expert_choice", bias_update_rate=0.1)
    with pytest.raises(ValueError, match="bias_update_rate"):
        RouterConfig("softmax", bias_update_rate=-1.0)
