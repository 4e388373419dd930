"""The MoE layer (:mod:`moe_ref.moe`): its output against an independent float64 reference, its gradients, the
auxiliary losses attached to the output, the dense paths, counting, configuration and hooks."""

import copy
import io
import pickle

import pytest
import torch
from conftest import assert_every_drop_counted, close64, reference_output
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from moe_ref import (FFN, AuxLossConfig, MoE, ResidualConfig, RouterConfig, SharedExpertConfig, count_params,
                     ffn_flops, ffn_params, load_balancing_loss, moe_flops, moe_params, router_z_loss,
                     sequence_balance_loss)
from moe_ref.book import ModelConfig, TinyTransformer, TrainConfig, build_corpus, train
from moe_ref.dispatch import routed_grouped, routed_naive, sort_by_expert

ROUTER_CONFIGS = {
    "softmax": RouterConfig(),
    "noisy": RouterConfig("noisy"),
    "sigmoid": RouterConfig("sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.0),
    "expert_choice": RouterConfig("expert_choice", capacity_factor=1.25),
}


def make(router="softmax", **kw):
    torch.manual_seed(0)
    return MoE(16, 24, 4, 2, router=ROUTER_CONFIGS.get(router, router), **kw)


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16), (16,), (2, 2, 3, 16)])
def test_shape_and_dtype_preserved(shape):
    moe = make()
    x = torch.randn(shape)
    y = moe(x)
    assert y.shape == shape and y.dtype == torch.float32
    close64(y, reference_output(moe, x), torch.float32)
    y = moe.bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == shape
    assert moe.experts.w_in.dtype == torch.bfloat16 and moe.router.gate.weight.dtype == torch.float32
    close64(y, reference_output(moe, x.bfloat16()), torch.bfloat16)


def test_empty_input():
    moe = make()
    x = torch.randn(2, 0, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (2, 0, 16) and moe.losses == {} and moe.aux_loss is None
    assert moe.tokens_per_expert.tolist() == [0, 0, 0, 0]


def test_attributes_after_forward():
    moe = make(aux_losses=AuxLossConfig(z_coef=1e-3, seq_balance_coef=1e-4))
    assert moe.last_routing is None and moe.aux_loss is None and moe.tokens_per_expert is None
    moe(torch.randn(3, 5, 16))
    r = moe.last_routing
    assert r.expert_indices.shape == (15, 2) and r.router_logits.shape == (15, 4)
    assert moe.tokens_per_expert.tolist() == torch.bincount(r.expert_indices.reshape(-1), minlength=4).tolist()
    assert int(moe.tokens_per_expert.sum()) == 30 and moe.last_capacity is None
    # the recorded losses are those of the recorded routing, unweighted
    assert set(moe.losses) == {"balance", "seq_balance", "z"}
    torch.testing.assert_close(moe.losses["balance"], load_balancing_loss(r.router_probs, r.expert_indices))
    torch.testing.assert_close(moe.losses["z"], router_z_loss(r.router_logits))
    torch.testing.assert_close(moe.losses["seq_balance"], sequence_balance_loss(r.router_probs.reshape(3, 5, 4),
                                                                                r.expert_indices.reshape(3, 5, 2)))
    expected = 0.01 * moe.losses["balance"] + 1e-4 * moe.losses["seq_balance"] + 1e-3 * moe.losses["z"]
    torch.testing.assert_close(moe.aux_loss, expected)
    # nothing kept on the module carries a graph
    kept = [*moe.losses.values(), moe.aux_loss, r.combine_weights, r.router_logits, r.router_scores, r.router_probs]
    assert not any(t.requires_grad for t in kept)


def test_which_losses_are_computed():
    x = torch.randn(4, 16)
    off = make(aux_losses=AuxLossConfig(balance_coef=0.0))
    off(x)
    assert off.losses == {} and off.aux_loss is None  # a coefficient of 0 computes nothing
    stats = make(aux_losses=AuxLossConfig(balance_coef=0.0, compute_all=True))
    stats(x)
    assert set(stats.losses) == {"balance", "seq_balance", "z"} and stats.aux_loss is None
    on = make()
    with torch.no_grad():  # no gradient wanted: nothing to attach, so nothing computed
        on(x)
    assert on.losses == {} and on.aux_loss is None
    with torch.no_grad():
        stats(x)
    assert set(stats.losses) == {"balance", "seq_balance", "z"}  # compute_all: statistics in eval loops too
    ec = make("expert_choice", aux_losses=AuxLossConfig(balance_coef=0.1, z_coef=0.1))
    ec(x)
    assert set(ec.losses) == {"z"}  # expert choice is balanced by construction


def test_return_losses():
    moe = make(aux_losses=AuxLossConfig(z_coef=1e-3))
    x = torch.randn(2, 6, 16)
    out, losses = moe(x, return_losses=True)
    assert set(losses) == {"balance", "seq_balance", "z"}  # every loss, whatever its coefficient
    assert all(loss.requires_grad for loss in losses.values())
    assert torch.equal(out, moe(x))
    r = moe.last_routing
    torch.testing.assert_close(losses["balance"].detach(), load_balancing_loss(r.router_probs, r.expert_indices))
    # nothing attached: the output's gradient is the plain layer's
    g = torch.randn_like(out)
    plain = make(aux_losses=AuxLossConfig(balance_coef=0.0))
    (grad,) = torch.autograd.grad(out, [moe.router.gate.weight], g)
    (grad_plain,) = torch.autograd.grad(plain(x), [plain.router.gate.weight], g)
    torch.testing.assert_close(grad, grad_plain)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_loss_gradient_is_attached_to_the_output(router, scale):
    config = AuxLossConfig(balance_coef=0.1, z_coef=0.01, seq_balance_coef=0.05, scale=scale)
    moe = make(router, aux_losses=config)
    without = copy.deepcopy(moe)
    without.loss_config = AuxLossConfig(balance_coef=0.0)
    explicit = copy.deepcopy(without)
    x = torch.randn(2, 6, 16)
    g = torch.randn(2, 6, 16)
    y = moe(x)
    y.backward(g)
    y_without = without(x)
    y_without.backward(g)
    assert torch.equal(y, y_without)  # the forward is unchanged
    _, losses = explicit(x, return_losses=True)
    weighted = sum(config.coef(name) * loss for name, loss in losses.items())
    (expected,) = torch.autograd.grad(scale * weighted, [explicit.router.gate.weight])
    difference = moe.router.gate.weight.grad - without.router.gate.weight.grad
    assert expected.abs().sum() > 0
    torch.testing.assert_close(difference, expected, atol=1e-6, rtol=1e-5)
    # the auxiliary losses depend on the router only: every other gradient is the same
    for (name, p), q in zip(moe.named_parameters(), without.parameters()):
        if not name.startswith("router."):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_module_holds_no_graph_after_a_forward():
    moe = make(aux_losses=AuxLossConfig(z_coef=1e-3))
    moe(torch.randn(2, 5, 16, requires_grad=True))
    clone = copy.deepcopy(moe)  # deepcopy refuses non-leaf tensors that carry a graph
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    pickle.dumps(moe)
    torch.testing.assert_close(clone.aux_loss, moe.aux_loss)


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
def test_dropless_conservation(router):
    moe = make(router).eval()
    x = torch.randn(2, 6, 16)
    y = moe(x)
    r = moe.last_routing
    plan = sort_by_expert(r)
    T = 12
    counts = torch.bincount(plan.token_ids, minlength=T)
    if router == "expert_choice":  # each expert takes exactly C tokens; a token gets any number
        C = 8  # ceil(1.25 * 12 * 2 / 4)
        assert r.tokens_per_expert.tolist() == [C] * 4 and plan.token_ids.numel() == 4 * C
        assert counts.tolist() == r.mask.sum(1).tolist()
    else:  # every token is processed by exactly k experts, with the router's weights
        assert counts.tolist() == [2] * T
        assert int(r.tokens_per_expert.sum()) == T * 2
    assert torch.all(plan.expert_ids[1:] >= plan.expert_ids[:-1])
    # each assignment carries the router's weight for that (token, expert)
    full = torch.zeros(T, 4).index_put_((plan.token_ids, plan.expert_ids), plan.combine_weights)
    router_full = torch.zeros(T, 4)
    router_full.scatter_add_(1, r.expert_indices, torch.where(r.mask, r.combine_weights, 0)
                             if r.mask is not None else r.combine_weights)
    torch.testing.assert_close(full, router_full)
    assert moe.num_dropped == 0 and moe.drop_rate == 0.0 and moe.tokens_dropped == 0
    assert_every_drop_counted(moe)
    close64(y, reference_output(moe, x), torch.float32)


def test_expert_choice_token_without_expert_gets_zero():
    moe = make(RouterConfig("expert_choice", capacity_factor=0.25)).eval()  # C = ceil(0.25 * 12 * 2 / 4) = 2
    x = torch.randn(12, 16)
    y = moe(x)
    assert moe.tokens_per_expert.tolist() == [2] * 4
    unrouted = ~moe.last_routing.mask.any(1)
    assert unrouted.sum() >= 12 - 8 and torch.all(y[unrouted] == 0)
    close64(y, reference_output(moe, x), torch.float32)


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_grouped_equals_naive_loop(router, backend):
    moe = make(router, backend=backend, shared=SharedExpertConfig(1, 8))  # training mode: the noise is on
    x = torch.randn(3, 7, 16, requires_grad=True)
    torch.manual_seed(1)
    y = moe(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    routing = moe.last_routing
    moe.impl = "naive"
    torch.manual_seed(1)
    y_ref = moe(x)
    assert torch.equal(moe.last_routing.expert_indices, routing.expert_indices)
    grads_ref = torch.autograd.grad(y_ref, [x, *moe.parameters()], g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    close64(y, reference_output(moe, x), torch.float32)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck_float64(activation):
    torch.manual_seed(0)
    # the attached auxiliary gradient does not depend on the output's gradient, so a Jacobian check needs the
    # losses off (they are checked through return_losses below)
    moe = MoE(4, 6, 4, 2, activation=activation, shared=SharedExpertConfig(1, 3),
              aux_losses=AuxLossConfig(balance_coef=0.0)).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    names = ["experts.w_in", "experts.w_out", "router.gate.weight", "shared.w_in.weight"]
    params = [dict(moe.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return functional_call(moe, dict(zip(names, ps)), (x,))

    def f_losses(x, *ps):
        out, losses = functional_call(moe, dict(zip(names, ps)), (x,), dict(return_losses=True))
        return out, losses["balance"], losses["z"], losses["seq_balance"]

    assert moe(x).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradcheck(f_losses, (x, *params))


def test_single_expert_equals_dense_ffn():
    torch.manual_seed(0)
    ffn = FFN(16, 24, "swiglu")
    moe = MoE(16, 24, 1, 1)
    with torch.no_grad():
        moe.experts.w_in[0] = ffn.w_in.weight.t()
        moe.experts.w_up[0] = ffn.w_up.weight.t()
        moe.experts.w_out[0] = ffn.w_out.weight.t()
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe(x), ffn(x))
    assert moe.flops_per_token() == ffn.flops_per_token() + 2 * 16 * 1


def test_shared_experts_are_a_sum_of_ffns():
    moe = make(shared=SharedExpertConfig(2, 8, gate=True)).eval()
    assert moe.shared.d_hidden == 16 and moe.shared_gate is not None
    x = torch.randn(6, 16)
    shared = [FFN(16, 8) for _ in range(2)]
    with torch.no_grad():
        for i, f in enumerate(shared):  # shared expert i is rows/columns i*8 .. i*8+7 of the wide FFN
            f.w_in.weight.copy_(moe.shared.w_in.weight[i * 8:(i + 1) * 8])
            f.w_up.weight.copy_(moe.shared.w_up.weight[i * 8:(i + 1) * 8])
            f.w_out.weight.copy_(moe.shared.w_out.weight[:, i * 8:(i + 1) * 8])
    y = moe(x)
    routed = routed_grouped(moe.experts, x, moe.last_routing)
    gate = torch.sigmoid(x @ moe.shared_gate.weight.t())
    torch.testing.assert_close(y, routed + gate * (shared[0](x) + shared[1](x)))
    close64(y, reference_output(moe, x), torch.float32)


def test_residual_moe():
    moe = make(residual=ResidualConfig(d_hidden=12)).eval()
    assert moe.residual_mlp.d_hidden == 12
    with torch.no_grad():
        moe.residual_coef.bias.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(6, 16)
    y = moe(x)
    c = torch.softmax(moe.residual_coef(x), -1)
    expected = c[:, :1] * moe.residual_mlp(x) + c[:, 1:] * routed_naive(moe.experts, x, moe.last_routing)
    torch.testing.assert_close(y, expected)
    close64(y, reference_output(moe, x), torch.float32)


@pytest.mark.parametrize("kw", [
    dict(), dict(activation="relu"), dict(router="noisy"), dict(shared=SharedExpertConfig(2, 8, gate=True)),
    dict(residual=ResidualConfig(12)), dict(router="sigmoid", shared=SharedExpertConfig(1)),
])
def test_param_counts(kw):
    moe = MoE(16, 24, 4, 2, **kw)
    counts = moe.param_counts()
    assert counts.total == count_params(moe)
    act = kw.get("activation", "swiglu")
    assert counts.total - counts.active == 2 * ffn_params(16, 24, act)  # the 2 inactive experts


def test_counts_by_hand():
    # router 16*8, 8 experts of 3*16*32, 2 shared experts of width 32 (one FFN of width 64)
    total, active = moe_params(16, 32, 8, 2, n_shared=2, d_shared=32)
    assert total == 16 * 8 + 8 * 3 * 16 * 32 + 3 * 16 * 64
    assert active == 16 * 8 + 2 * 3 * 16 * 32 + 3 * 16 * 64
    assert moe_flops(16, 32, 8, 2, n_shared=2, d_shared=32) == 2 * 16 * 8 + 2 * ffn_flops(16, 32) + ffn_flops(16, 64)
    shared = MoE(16, 32, 8, 2, shared=SharedExpertConfig(2, 32))
    assert shared.flops_per_token() == 2 * 16 * 8 + 2 * ffn_flops(16, 32) + ffn_flops(16, 64)
    assert tuple(shared.param_counts()) == (total, active)
    # expert choice: k * capacity_factor experts per token on average
    assert moe_flops(16, 32, 8, 2, router="expert_choice", capacity_factor=1.5) == 2 * 16 * 8 + 3 * ffn_flops(16, 32)
    ec = MoE(16, 32, 8, 2, router=RouterConfig("expert_choice", capacity_factor=1.5))
    assert ec.flops_per_token() == 2 * 16 * 8 + 3 * ffn_flops(16, 32)


@pytest.mark.parametrize("args,kw,error,match", [
    ((16, 24, 4, 5), {}, ValueError, "k must be <= num_experts=4"),
    ((16, 24, 4, 0), {}, ValueError, "k must be >= 1"),
    ((16, 24, 0, 1), {}, ValueError, "num_experts must be >= 1"),
    ((0, 24, 4, 2), {}, ValueError, "d_model must be >= 1"),
    ((16, -3, 4, 2), {}, ValueError, "d_hidden must be >= 1"),
    ((16, 24.0, 4, 2), {}, TypeError, "d_hidden must be an int"),
    ((16, 24, 4, 2), dict(router="hash"), ValueError, "kind must be one of"),
    ((16, 24, 4, 2), dict(router=3), TypeError, "router must be a RouterConfig"),
    ((16, 24, 4, 2), dict(activation="tanh"), ValueError, "activation must be one of"),
    ((16, 24, 4, 2), dict(shared=2), TypeError, "shared must be a SharedExpertConfig or None"),
    ((16, 24, 4, 2), dict(residual=True), TypeError, "residual must be a ResidualConfig or None"),
    ((16, 24, 4, 2), dict(aux_losses=dict(balance_coef=0.1)), TypeError, "aux_losses must be an? AuxLossConfig"),
    ((16, 24, 4, 2), dict(residual=ResidualConfig(), shared=SharedExpertConfig()), ValueError, "use it or shared"),
    ((16, 24, 4, 2), dict(backend="cuda"), ValueError, "backend must be one of"),
    ((16, 24, 4, 2), dict(impl="fast"), ValueError, "impl must be one of"),
    ((16, 24, 4, 2), dict(balance_coef=0.1), TypeError, "unexpected keyword argument 'balance_coef'"),
])
def test_bad_constructor_arguments(args, kw, error, match):
    with pytest.raises(error, match=match):
        MoE(*args, **kw)


@pytest.mark.parametrize("make_config,error,match", [
    (lambda: RouterConfig(n_group=2), ValueError, "n_group applies only to router"),
    (lambda: SharedExpertConfig(0), ValueError, "num must be >= 1"),
    (lambda: SharedExpertConfig(1, gate=1), TypeError, "gate must be a bool"),
    (lambda: ResidualConfig(d_hidden=0), ValueError, "d_hidden must be >= 1"),
    (lambda: AuxLossConfig(balance_coef=-1.0), ValueError, "balance_coef must be >= 0"),
])
def test_bad_configs(make_config, error, match):
    with pytest.raises(error, match=match):
        make_config()


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(3, 15), ValueError, "x must have last dimension 16"),
    (torch.ones(3, 16, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
    (torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
    ([[0.0] * 16], TypeError, "x must be a torch.Tensor"),
    (torch.randn(3, 16, dtype=torch.float64), TypeError, "x has dtype torch.float64 but the module's parameters"),
])
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        make()(x)


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(2, 4, dtype=torch.bool), ValueError, r"token_mask must have shape \(2, 5\)"),
    (torch.ones(2, 5), TypeError, "token_mask must be a bool or integer tensor"),
    ([[1] * 5] * 2, TypeError, "token_mask must be a torch.Tensor"),
])
def test_bad_token_mask(mask, error, match):
    with pytest.raises(error, match=match):
        make()(torch.randn(2, 5, 16), mask)


def test_token_mask():
    moe = make()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    y = moe(x, mask)
    assert torch.all(y[mask == 0] == 0)  # padding is not routed
    assert int(moe.tokens_per_expert.sum()) == 8 * 2
    close64(y, reference_output(moe, x, mask), torch.float32)
    r = moe.last_routing
    real = mask.reshape(-1).bool()
    torch.testing.assert_close(moe.losses["balance"],
                               load_balancing_loss(r.router_probs[real], r.expert_indices[real]))
    # the real tokens' outputs do not depend on the padding
    torch.testing.assert_close(y[mask == 1], moe(x)[mask == 1])


def test_after_optimizer_step():
    moe = make(RouterConfig("sigmoid", bias_update_rate=0.1))
    moe(torch.randn(2, 8, 16))
    load = moe.tokens_per_expert.float()
    assert moe.router.load_since_update.tolist() == moe.tokens_per_expert.tolist()
    moe.after_optimizer_step()
    torch.testing.assert_close(moe.router.expert_bias, 0.1 * torch.sign(load.mean() - load))
    assert moe.router.expert_bias.abs().sum() > 0 and moe.router.load_since_update.sum() == 0
    plain = make()
    plain(torch.randn(2, 8, 16))
    state = copy.deepcopy(plain.state_dict())
    plain.after_optimizer_step()  # a no-op for the other routers
    assert all(torch.equal(state[name], value) for name, value in plain.state_dict().items())


def test_load_counted_once_per_training_forward():
    moe = make(RouterConfig("sigmoid"))
    x = torch.randn(2, 6, 16, requires_grad=True)
    moe.eval()
    moe(x)
    assert moe.router.load_since_update.sum() == 0  # evaluation does not count
    moe.train()
    moe(x)
    first = moe.tokens_per_expert.clone()
    assert moe.router.load_since_update.tolist() == first.tolist()
    # activation checkpointing runs the forward again during backward: counted once
    y = checkpoint(moe, x, use_reentrant=False)
    y.sum().backward()
    assert moe.router.load_since_update.tolist() == (2 * first).tolist()


@pytest.mark.parametrize("router,kw", [
    (RouterConfig("sigmoid", bias_update_rate=0.01), dict(aux_losses=AuxLossConfig(seq_balance_coef=1e-3))),
    ("softmax", dict(aux_losses=AuxLossConfig(z_coef=1e-3))),
])
def test_training_loop_hooks(router, kw):
    corpus = build_corpus(bytes_per_domain=20_000)
    config = ModelConfig(block_size=16, d_model=32, n_layers=2, n_heads=2, d_hidden=64)
    torch.manual_seed(0)
    model = TinyTransformer(config, ffn_factory=lambda i: MoE(32, 32, 4, 2, router=router, **kw))
    seen = []  # the layers' aux losses as the loop's callback sees them after each step

    def callback(step, model, x, labels):
        seen.append(sum(ffn.aux_loss.item() for ffn in model.ffns))

    history = train(model, corpus, TrainConfig(steps=3, eval_every=3, batch_size=4, block_size=16), progress=False,
                    callback=callback)
    assert history.aux_loss == pytest.approx(seen) and all(0 < a < 1 for a in history.aux_loss)
    assert model.flops_per_token() > 0
    if isinstance(router, RouterConfig):
        assert all(ffn.router.expert_bias.abs().sum() > 0 for ffn in model.ffns)
        # the last update reset the counts, and evaluation (eval mode) added none
        assert all(ffn.router.load_since_update.sum() == 0 for ffn in model.ffns)
    # the aux loss reaches the routers through the language-model loss's backward alone
    batch = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(0))[:2]
    model.train()

    def router_grads():
        model.zero_grad()
        torch.manual_seed(0)
        model(*batch)[1].backward()
        return [ffn.router.gate.weight.grad.clone() for ffn in model.ffns]

    with_aux = router_grads()
    configs = [ffn.loss_config for ffn in model.ffns]
    for ffn in model.ffns:
        ffn.loss_config = AuxLossConfig(balance_coef=0.0)
    without_aux = router_grads()
    for ffn, c in zip(model.ffns, configs):
        ffn.loss_config = c
    assert all(not torch.allclose(a, b) for a, b in zip(with_aux, without_aux))
