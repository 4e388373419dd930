import subprocess
import sys

import pytest
import torch
from torch import nn

from moe_ref import AuxLossConfig, MoE, RouterConfig, from_hf

transformers = pytest.importorskip("transformers")


def mixtral(jitter=0.0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4,
                                               num_experts_per_tok=2, router_jitter_noise=jitter))


def qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16,
                                                 shared_expert_intermediate_size=24, num_experts=8,
                                                 num_experts_per_tok=2, norm_topk_prob=False))


def qwen3_moe():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8,
                                                 num_experts_per_tok=2, norm_topk_prob=True))


def olmoe():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    return OlmoeSparseMoeBlock(OlmoeConfig(hidden_size=32, intermediate_size=16, num_experts=8,
                                           num_experts_per_tok=3))


def deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    return DeepseekV3MoE(DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                          num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=2,
                                          routed_scaling_factor=2.5))


FAMILIES = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
            "deepseek_v3": deepseek_v3}


def random_block(name, **kw):
    torch.manual_seed(0)
    block = FAMILIES[name](**kw)
    block.experts.config._experts_implementation = "eager"  # the reference loop; silences a warning
    with torch.no_grad():  # transformers leaves the fused expert weights uninitialised
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        for b in block.buffers():  # DeepSeek-V3's selection bias
            b.normal_(0.0, 0.1)
    return block


@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_and_backward_agree(name):
    block = random_block(name)
    moe = from_hf(block)
    assert isinstance(moe, MoE)
    x = torch.randn(2, 5, 32, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    y, y_ours = block(x), moe(x_ours)
    assert y_ours.shape == y.shape and y_ours.dtype == y.dtype
    torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
    # the routing is the same, not just the output
    hf_logits = nn.functional.linear(x.detach().reshape(-1, 32), block.gate.weight)
    torch.testing.assert_close(moe.last_routing.router_logits, hf_logits)

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ours.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.gate.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-5)
    d_hidden = moe.d_hidden
    gate_up_grad = block.experts.gate_up_proj.grad
    torch.testing.assert_close(moe.experts.w_in.grad, gate_up_grad[:, :d_hidden].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w_up.grad, gate_up_grad[:, d_hidden:].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w_out.grad, block.experts.down_proj.grad.transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


def test_configuration_is_read_from_the_block():
    moe = from_hf(random_block("deepseek_v3"))
    r = moe.router
    assert (r.n_group, r.topk_group, r.routed_scaling_factor, r.norm_topk_prob) == (4, 2, 2.5, True)
    assert moe.router_config.kind == "sigmoid"
    assert (moe.shared_config.num, moe.shared_config.d_hidden, moe.shared_config.gate) == (2, 16, False)
    assert r.expert_bias.abs().sum() > 0
    # every auxiliary loss is off: the converted layer computes the block's function and nothing else
    assert moe.loss_config == AuxLossConfig(balance_coef=0.0)
    moe(torch.randn(3, 32))
    assert moe.losses == {} and moe.aux_loss is None
    moe = from_hf(random_block("qwen2_moe"))
    assert moe.router.norm_topk_prob is False and moe.shared_gate is not None
    assert (moe.shared_config.num, moe.shared_config.d_hidden, moe.shared_config.gate) == (1, 24, True)
    assert from_hf(random_block("olmoe")).k == 3
    assert from_hf(random_block("mixtral")).router_config == RouterConfig(norm_topk_prob=True)


def test_unsupported_modules():
    with pytest.raises(TypeError, match="does not support Linear"):
        from_hf(nn.Linear(4, 4))
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm, MixtralSparseMoeBlock

    with pytest.raises(TypeError, match="does not support MixtralRMSNorm"):
        from_hf(MixtralRMSNorm(8))
    with pytest.raises(TypeError, match="block must be a torch.nn.Module"):
        from_hf("mixtral")
    # a look-alike with a supported name is not a transformers block
    fake = type("MixtralSparseMoeBlock", (nn.Module,), {})()
    with pytest.raises(TypeError, match="does not support MixtralSparseMoeBlock"):
        from_hf(fake)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=2,
                                                num_experts_per_tok=1, hidden_act="tanh"))
    with pytest.raises(ValueError, match="hidden_act='tanh' is not supported"):
        from_hf(block)


def _run_pair(block, moe, x, seed):
    """Forward and backward of both after the same seed. ``transformers`` multiplies its input by the jitter in
    place, so it gets a copy (not a leaf)."""
    x_hf = x.detach().clone().requires_grad_()
    x_ours = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = block(x_hf * 1.0)
    torch.manual_seed(seed)
    y_ours = moe(x_ours)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ours.backward(grad_out)
    return y, y_ours, x_hf.grad, x_ours.grad


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mixtral_router_jitter(mode):
    block = random_block("mixtral", jitter=0.1)
    moe = from_hf(block)
    # Mixtral multiplies the whole block input by the noise: the router and the experts see it
    assert moe.router_config == RouterConfig(norm_topk_prob=True, jitter_noise=0.1, jitter_experts=True)
    block.train(mode == "train")
    moe.train(mode == "train")
    x = torch.randn(2, 5, 32)
    y, y_ours, gx, gx_ours = _run_pair(block, moe, x, seed=7)
    if mode == "eval":  # no noise: the same output whatever the seed, on both sides
        y_other, y_ours_other, _, _ = _run_pair(block, moe, x, seed=8)
        assert torch.equal(y_ours_other, y_ours) and torch.equal(y_other, y)
    else:  # the noise is there, and it is the block's noise
        noisy_logits = moe.last_routing.router_logits
        clean_logits = nn.functional.linear(x.reshape(-1, 32), block.gate.weight)
        assert not torch.allclose(noisy_logits, clean_logits)
    torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_ours, gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.router.gate.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w_out.grad, block.experts.down_proj.grad.transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


def test_import_does_not_import_transformers():
    code = "import sys, moe_ref; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
