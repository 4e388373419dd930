"""One test per problem listed in issue #8 ("Why"): each failed on the code before the restructure.

The items are in the issue's order: silent wrong answers, crashes, real checkpoints refused, structure.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_ref
from conftest import close64, reference_output
from moe_ref import (AuxLossConfig, CapacityConfig, MoE, ResidualConfig, RouterConfig, expert_capacity,
                     grouped_mm)
from moe_ref.book import ModelConfig, TinyTransformer
from moe_ref.dispatch import combine, permute, sort_by_expert
from moe_ref.routers import ExpertChoiceRouter

transformers = pytest.importorskip("transformers")

SIGMOID = RouterConfig("sigmoid", n_group=2, topk_group=1, bias_update_rate=0.01)


def small(**kw):
    torch.manual_seed(0)
    return MoE(16, 24, 4, 2, **kw)


# --- silent wrong answers ---------------------------------------------------------------------------------

def test_bf16_cast_keeps_the_selection_bias_and_gate_in_float32():
    moe = small(router=SIGMOID)
    bias = torch.tensor([1e-3, -2e-3, 3.3e-3, 1.0001])  # 1.0001 rounds to 1.0 in bfloat16
    moe.router.expert_bias.copy_(bias)
    gate = moe.router.gate.weight.detach().clone()
    moe.to(torch.bfloat16)
    assert moe.router.expert_bias.dtype == torch.float32 and torch.equal(moe.router.expert_bias, bias)
    assert moe.router.gate.weight.dtype == torch.float32 and torch.equal(moe.router.gate.weight, gate)
    assert moe.experts.w_in.dtype == torch.bfloat16  # everything else is cast
    moe.half()
    assert torch.equal(moe.router.expert_bias, bias)
    moe.double()  # float64 is not a lowering: the router follows
    assert moe.router.gate.weight.dtype == torch.float64


def test_from_hf_bf16_deepseek_v3_routes_like_the_block():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    block = DeepseekV3MoE(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
        # small, distinct corrections: bfloat16 would round several of them together
        block.gate.e_score_correction_bias.copy_(torch.linspace(-3e-3, 3e-3, 16) + 1.0)
    block.to(torch.bfloat16)
    block.gate.float()  # transformers keeps gate.weight and e_score_correction_bias in float32
    moe = from_hf_eval(block)
    x = torch.randn(256, 32).to(torch.bfloat16)
    _, _, hf_indices = block.gate(x)
    moe(x)
    ours = moe.last_routing.expert_indices
    assert torch.equal(ours.sort(dim=1).values, hf_indices.sort(dim=1).values)


def from_hf_eval(block):
    moe = moe_ref.from_hf(block)
    return moe.eval()


def test_einsum_keeps_an_infinite_token_to_itself():
    moe = small(impl="einsum")
    x = torch.randn(6, 16)
    clean = moe(x)
    x[2, 3] = float("inf")
    dirty = moe(x)
    others = [0, 1, 3, 4, 5]
    assert torch.isfinite(dirty[others]).all()
    torch.testing.assert_close(dirty[others], clean[others])
    assert not torch.isfinite(dirty[2]).all()


def test_residual_moe_is_float64_in_a_float64_module():
    moe = small(residual=ResidualConfig(d_hidden=8), aux_losses=AuxLossConfig(balance_coef=0.0)).double()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: moe(t), (x,))


def test_capacity_is_at_least_one_slot_for_a_non_empty_group():
    assert expert_capacity(8, 4, 2, capacity_factor=1e-10) == 1
    assert expert_capacity(0, 4, 2, capacity_factor=1.0) == 0
    with pytest.raises(ValueError):  # and an explicit 0 is refused
        expert_capacity(8, 4, 2, capacity=0)


def test_meta_init_then_load_state_dict_restores_the_load_counters():
    trained = small(router=SIGMOID)
    trained.train()
    trained(torch.randn(2, 8, 16))  # counts some load, not yet used by an update
    with torch.device("meta"):
        fresh = MoE(16, 24, 4, 2, router=SIGMOID)
    fresh.to_empty(device="cpu")
    fresh.router.load_since_update.fill_(12345)  # what uninitialised memory may hold
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.router.load_since_update, trained.router.load_since_update)
    trained.after_optimizer_step()
    fresh.after_optimizer_step()
    assert torch.equal(fresh.router.expert_bias, trained.router.expert_bias)
    # and reset_parameters (the other meta-device idiom) zeroes them
    fresh.router.load_since_update.fill_(7)
    fresh.reset_parameters()
    assert int(fresh.router.load_since_update.abs().sum()) == 0


def test_tiny_transformer_init_respects_noisy_router_and_scales_expert_outputs():
    config = ModelConfig(block_size=16, d_model=32, n_layers=4, n_heads=4)
    torch.manual_seed(0)
    model = TinyTransformer(config, lambda i: MoE(32, 64, 8, 2, router="noisy", init_std=0.02))
    for ffn in model.ffns:
        assert int(ffn.router.w_noise.count_nonzero()) == 0
        std = float(ffn.experts.w_out.detach().std())
        expected = 0.02 / (2 * config.n_layers) ** 0.5  # GPT-2's residual scaling, 0.005
        assert abs(std - expected) < 0.15 * expected, std


def test_bias_update_runs_once_per_optimizer_step():
    from moe_ref.book import TrainConfig, build_corpus, train

    corpus = build_corpus(bytes_per_domain=20_000)
    config = ModelConfig(block_size=16, d_model=32, n_layers=1, n_heads=4)
    torch.manual_seed(0)
    model = TinyTransformer(config, lambda i: MoE(32, 32, 4, 2, router=SIGMOID))
    train(model, corpus, TrainConfig(steps=1, batch_size=4, eval_every=1, eval_batches=1, warmup=1),
          progress=False)
    bias = model.ffns[0].router.expert_bias
    # one update moves every bias by exactly the rate (or not at all, for an expert at the mean load)
    rate = torch.tensor(0.01)  # in float32, as the bias
    assert all(v in (0.0, float(rate)) for v in bias.abs().tolist()) and float(bias.abs().max()) == float(rate)


def test_unknown_impl_or_backend_is_refused_when_assigned():
    moe = small()
    with pytest.raises(ValueError, match="impl must be one of"):
        moe.impl = "typo"
    with pytest.raises(ValueError, match="backend must be one of"):
        moe.backend = "cutlass"
    assert (moe.impl, moe.backend) == ("grouped", None)  # unchanged by the refused assignments


# --- crashes ------------------------------------------------------------------------------------------------

def test_deepcopy_after_a_forward_with_gradients_and_no_graph_kept():
    moe = small(aux_losses=AuxLossConfig(balance_coef=0.01, z_coef=1e-3))
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = moe(x)
    clone = copy.deepcopy(moe)
    torch.testing.assert_close(clone(x.detach()), y.detach())
    kept = [moe.aux_loss, *moe.losses.values(), moe.last_routing.router_logits, moe.last_routing.combine_weights]
    assert all(t.grad_fn is None and not t.requires_grad for t in kept)


@pytest.mark.parametrize("impl", sorted(moe_ref.IMPLS))
def test_torch_compile_on_the_default_float32_cpu_path(impl):
    moe = small(impl=impl)
    x = torch.randn(2, 5, 16, requires_grad=True)
    eager = moe(x)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    compiled = torch.compile(moe, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in moe.named_parameters():  # the router's includes the balance loss's gradient
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_autocast_every_impl_runs_and_returns_the_input_dtype():
    outs = {}
    for impl in moe_ref.IMPLS:
        moe = small(impl=impl)
        x = torch.randn(2, 5, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[impl] = moe(x)
        assert outs[impl].dtype == torch.float32
        assert moe.last_routing.router_logits.dtype == torch.float32
    for impl, out in outs.items():
        torch.testing.assert_close(out, outs["grouped"], rtol=2e-2, atol=2e-2, msg=impl)


def test_grouped_mm_torch_backend_with_empty_inner_or_outer_dimension():
    offsets = torch.tensor([2, 5], dtype=torch.int32)
    for K, N in ((0, 3), (4, 0)):
        x = torch.randn(5, K, requires_grad=True)
        w = torch.randn(2, K, N, requires_grad=True)
        out = grouped_mm(x, w, offsets, backend="torch")
        assert out.shape == (5, N) and int(out.count_nonzero()) == 0
        out.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("impl", sorted(moe_ref.IMPLS))
def test_nothing_routed_still_has_a_gradient_path(impl):
    moe = small(impl=impl)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = moe(x, token_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert y.requires_grad and int(y.count_nonzero()) == 0
    y.sum().backward()
    assert x.grad is not None and moe.experts.w_in.grad is not None


def test_expert_choice_router_takes_an_empty_input():
    router = ExpertChoiceRouter(16, 4, 2)
    routing = router(torch.randn(0, 16))
    assert routing.expert_indices.shape == (0, 4) and routing.tokens_per_expert.tolist() == [0] * 4
    moe = small(router="expert_choice")
    x = torch.randn(0, 16, requires_grad=True)
    moe(x).sum().backward()


def test_mismatched_dtype_or_device_gets_a_clear_error():
    moe = small().double()
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the module's parameters are torch.float64"):
        moe(torch.randn(3, 16))
    x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="offsets must be on the device of x"):
        grouped_mm(x, w, torch.tensor([2, 5], dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="token_mask must have shape"):
        small()(torch.randn(2, 3, 16), token_mask=torch.ones(3, 2, dtype=torch.bool))


# --- real checkpoints ---------------------------------------------------------------------------------------

def test_from_hf_accepts_router_jitter_as_released():
    from transformers import MixtralConfig, SwitchTransformersConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    torch.manual_seed(0)
    switch = SwitchTransformersSparseMLP(SwitchTransformersConfig(d_model=16, d_ff=32, num_experts=4,
                                                                  expert_capacity=8, router_jitter_noise=0.01))
    mixtral = MixtralSparseMoeBlock(MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=4,
                                                  num_experts_per_tok=2, router_jitter_noise=0.1))
    with torch.no_grad():
        for p in mixtral.parameters():
            p.normal_(0, 0.1)
    for block, eps in ((switch, 0.01), (mixtral, 0.1)):
        moe = moe_ref.from_hf(block)
        assert moe.router.jitter_noise == eps
        block.eval(), moe.eval()
        x = torch.randn(2, 6, 16)
        expected = block(x.clone())
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)


# --- structure --------------------------------------------------------------------------------------------

def test_combine_accumulates_in_float32():
    torch.manual_seed(0)
    moe = MoE(16, 24, 8, 8, router=RouterConfig(norm_topk_prob=False))
    x = torch.randn(64, 16)
    routing = moe.router(x)
    plan = sort_by_expert(routing)
    y_sorted = moe.experts(permute(x, plan), plan.offsets).to(torch.bfloat16)
    out = combine(y_sorted, plan, 64)
    assert out.dtype == torch.float32
    expected = torch.zeros(64, 16, dtype=torch.float64).index_add_(
        0, plan.token_ids, y_sorted.double() * plan.combine_weights.double().unsqueeze(1))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    again = combine(y_sorted, plan, 64)
    assert torch.equal(out, again)  # deterministic: each (token, slot) row written once


def test_one_training_hook_per_layer():
    config = ModelConfig(block_size=16, d_model=32, n_layers=2, n_heads=4)
    model = TinyTransformer(config, lambda i: MoE(32, 32, 4, 2, router=SIGMOID))
    hooks = [m for m in model.modules() if callable(getattr(m, "after_optimizer_step", None))]
    assert hooks == model.ffns


# --- losses: checkpointing, padding, when they are computed ---------------------------------------------

def test_activation_checkpointing_counts_losses_and_load_once():
    coefs = AuxLossConfig(balance_coef=0.1, z_coef=0.01)
    for use_reentrant in (False, True):
        plain, ckpt = small(router=SIGMOID, aux_losses=coefs), small(router=SIGMOID, aux_losses=coefs)
        x = torch.randn(2, 6, 16, requires_grad=True)
        plain(x).pow(2).sum().backward()
        checkpoint(ckpt, x, use_reentrant=use_reentrant).pow(2).sum().backward()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert torch.equal(ckpt.router.load_since_update, plain.router.load_since_update)
        assert int(plain.router.load_since_update.sum()) == 2 * 6 * 2


def test_aux_loss_gradient_is_the_weighted_losses_gradient():
    coefs = AuxLossConfig(balance_coef=0.3, z_coef=0.05, seq_balance_coef=0.2)
    with_losses, without = small(aux_losses=coefs), small(aux_losses=AuxLossConfig(balance_coef=0.0))
    x = torch.randn(3, 5, 16)
    with_losses(x).sum().backward()
    without(x).sum().backward()
    _, losses = small(aux_losses=coefs)(x, return_losses=True)
    reference = small(aux_losses=coefs)
    _, losses = reference(x, return_losses=True)
    weighted = 0.3 * losses["balance"] + 0.05 * losses["z"] + 0.2 * losses["seq_balance"]
    (grad,) = torch.autograd.grad(weighted, reference.router.gate.weight)
    torch.testing.assert_close(with_losses.router.gate.weight.grad - without.router.gate.weight.grad, grad)


def test_losses_only_when_wanted():
    moe = small(aux_losses=AuxLossConfig(balance_coef=0.01))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        moe(x)
    assert moe.losses == {} and moe.aux_loss is None
    moe(x)
    assert set(moe.losses) == {"balance"}
    moe.loss_config = AuxLossConfig(balance_coef=0.01, compute_all=True)
    with torch.no_grad():
        moe(x)
    assert set(moe.losses) == {"balance", "seq_balance", "z"}


def test_padding_counts_in_no_loss_statistic_or_capacity():
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, 2, capacity=CapacityConfig(capacity_factor=1.0),
              aux_losses=AuxLossConfig(balance_coef=0.01, z_coef=0.01, seq_balance_coef=0.01, compute_all=True))
    real = torch.randn(1, 8, 16)
    padded = torch.cat([torch.randn(1, 4, 16), real], dim=1)  # left padding: 4 pad tokens first
    mask = torch.tensor([[False] * 4 + [True] * 8])
    y_padded = moe(padded, mask)
    stats = {n: v.clone() for n, v in moe.losses.items()}
    tokens = moe.tokens_per_expert.clone()
    assert int(tokens.sum()) == 8 * 2
    close64(y_padded[:, 4:], reference_output(moe, padded, mask)[:, 4:], torch.float32)
    assert int(y_padded[:, :4].count_nonzero()) == 0
    # the same real tokens alone, with the capacity of a 12-token sequence, give the same routing and losses
    moe.capacity_config = CapacityConfig(capacity=expert_capacity(12, 4, 2, capacity_factor=1.0))
    y_real = moe(real)
    torch.testing.assert_close(y_padded[:, 4:], y_real)
    assert torch.equal(moe.tokens_per_expert, tokens)
    for name, value in stats.items():
        torch.testing.assert_close(moe.losses[name], value, msg=name)


def test_ddp_single_process_gloo(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        moe = small(aux_losses=AuxLossConfig(balance_coef=0.1))
        reference = copy.deepcopy(moe)
        ddp = DistributedDataParallel(moe)
        x = torch.randn(2, 5, 16)
        ddp(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        for p, q in zip(moe.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    finally:
        dist.destroy_process_group()


def test_fsdp2_single_process_gloo(tmp_path, recwarn):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        moe = small(aux_losses=AuxLossConfig(balance_coef=0.1))
        reference = copy.deepcopy(moe)
        fully_shard(moe)
        x = torch.randn(2, 5, 16)
        moe(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        for (name, p), q in zip(moe.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=name)
        assert not [w for w in recwarn if "view" in str(w.message)]  # the output is not a view
    finally:
        dist.destroy_process_group()
