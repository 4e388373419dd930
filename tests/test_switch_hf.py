import dataclasses

import pytest
import torch

from moe_ref import CapacityConfig, MoE, RouterConfig, from_hf

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
    assert isinstance(moe, MoE) and moe.k == 1
    assert moe.capacity_config == CapacityConfig(capacity=3, group="sequence", drop_priority="position")
    assert moe.router_config == RouterConfig(norm_topk_prob=False) and moe.activation == act
    block.train(mode == "train")
    moe.train(mode == "train")
    x = torch.randn(3, 10, 16, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    y, y_ours = block(x), moe(x_ours)
    assert moe.num_dropped > 0  # 10 tokens per sequence, 4 experts of capacity 3: some expert overflows
    torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
    # the block returns exactly zero for the dropped tokens, and drops the same ones
    dropped = moe.last_capacity.dropped[:, 0].reshape(3, 10)
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
    assert moe.num_dropped == 0 and moe.last_capacity.capacity == 7


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
    assert not torch.equal(moe.last_capacity.dropped, per_sequence.last_capacity.dropped)


def _hf_routing(block, x):
    """Run the block and return its output and its router's logits (a forward hook)."""
    seen = {}
    handle = block.router.register_forward_hook(lambda mod, args, out: seen.update(logits=out[2]))
    try:
        y = block(x)
    finally:
        handle.remove()
    return y, seen["logits"].reshape(-1, seen["logits"].shape[-1])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_router_jitter(mode):
    block = switch_block(router_jitter_noise=0.1)
    moe = from_hf(block)
    # Switch jitters the router's input only (Fedus et al. 2022)
    assert moe.router_config == RouterConfig(norm_topk_prob=False, jitter_noise=0.1, jitter_experts=False)
    block.train(mode == "train")
    moe.train(mode == "train")
    x = torch.randn(3, 10, 16)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    y, hf_logits = _hf_routing(block, x_hf * 1.0)  # transformers multiplies its input in place: not a leaf
    torch.manual_seed(3)
    y_ours = moe(x_ours)
    # the same noise, so the same logits and the same routing
    torch.testing.assert_close(moe.last_routing.router_logits, hf_logits, atol=1e-6, rtol=1e-6)
    clean = x.reshape(-1, 16) @ block.router.classifier.weight.detach().t()
    assert torch.allclose(hf_logits, clean, atol=1e-6) == (mode == "eval")
    assert torch.equal(y.detach().abs().sum(-1) == 0, moe.last_capacity.dropped[:, 0].reshape(3, 10))
    if mode == "train":
        # transformers' router computes `hidden_states = hidden_states.to(float32)`, a no-op on float32 input,
        # then `hidden_states *= noise`: that writes the noise into the block's input, which its experts read
        # next. So a float32 block's experts see the jittered input too, as with jitter_experts=True, and the
        # clean-input converted layer (Switch's definition) does not match its output.
        moe.router_config = dataclasses.replace(moe.router_config, jitter_experts=True)
        x_ours.grad = None
        moe.zero_grad()
        torch.manual_seed(3)
        y_ours = moe(x_ours)
    torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.gate.weight.grad, block.router.classifier.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (dict(router_bias=True), "router_bias"),
    (dict(router_dtype="bfloat16"), "router_dtype"),
    (dict(dense_act_fn="gelu_new"), "expert activation"),
])
def test_refused_configurations(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_hf(switch_block(**overrides))
