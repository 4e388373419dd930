import pytest
import torch

from moe_ref import MoE, from_hf

transformers = pytest.importorskip("transformers")


def switch_block(seed=0, **overrides):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    config = dict(d_model=16, d_ff=24, num_experts=4, expert_capacity=3, router_jitter_noise=0.0, dropout_rate=0.0,
                  dense_act_fn="relu")
    torch.manual_seed(seed)
    block = SwitchTransformersSparseMLP(SwitchTransformersConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_and_backward_agree_with_drops(act, mode):
    block = switch_block(dense_act_fn=act)
    moe = from_hf(block)
    assert isinstance(moe, MoE) and moe.k == 1 and moe.capacity == 3 and moe.capacity_group == "sequence"
    block.train(mode == "train")
    moe.train(mode == "train")
    x = torch.randn(3, 10, 16, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    y, y_ours = block(x), moe(x_ours)
    assert moe.num_dropped > 0  # 10 tokens per sequence, 4 experts of capacity 3: some expert overflows
    torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
    # the block returns exactly zero for the dropped tokens, and drops the same ones
    dropped = moe.last_routing.dropped[:, 0].reshape(3, 10)
    assert torch.equal(y.detach().abs().sum(-1) == 0, dropped)
    assert torch.all(y_ours[dropped] == 0)

    g = torch.randn_like(y)
    y.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.gate.weight.grad, block.router.classifier.weight.grad, atol=1e-5, rtol=1e-5)
    for e in range(4):
        expert = block.experts[f"expert_{e}"]
        torch.testing.assert_close(moe.experts.w_in.grad[e], expert.wi.weight.grad.t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe.experts.w_out.grad[e], expert.wo.weight.grad.t(), atol=1e-5, rtol=1e-5)


def test_large_capacity_drops_nothing():
    block = switch_block(expert_capacity=64)
    moe = from_hf(block)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(moe(x), block(x), atol=1e-5, rtol=1e-5)
    assert moe.num_dropped == 0 and moe.last_routing.capacity == 7


def test_capacity_is_per_sequence():
    block = switch_block(seed=1)
    moe = from_hf(block)
    x = torch.randn(4, 8, 16)
    y = block(x)
    torch.testing.assert_close(moe(x), y, atol=1e-5, rtol=1e-5)
    # the same tokens as one long sequence would drop differently (capacity 3 over 32 tokens)
    moe(x.reshape(1, 32, 16))
    per_sequence = from_hf(block)
    per_sequence(x)
    assert not torch.equal(moe.last_routing.dropped, per_sequence.last_routing.dropped)


@pytest.mark.parametrize("overrides,match", [
    (dict(router_jitter_noise=0.01), "router_jitter_noise"),
    (dict(router_bias=True), "router_bias"),
    (dict(router_dtype="bfloat16"), "router_dtype"),
    (dict(dense_act_fn="gelu_new"), "expert activation"),
])
def test_refused_configurations(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_hf(switch_block(**overrides))
