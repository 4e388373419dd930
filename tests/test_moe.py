import pytest
import torch
from torch.func import functional_call

from moe_ref import (FFN, MoE, ModelConfig, TinyTransformer, TrainConfig, build_corpus, count_params, ffn_flops,
                     ffn_params, moe_flops, moe_params, train)
from moe_ref.moe import sort_by_expert

ROUTER_CONFIGS = {
    "softmax": {},
    "noisy": {},
    "sigmoid": dict(n_group=2, topk_group=1, routed_scaling_factor=2.0),
    "expert_choice": dict(capacity_factor=1.25),
}


def make(router="softmax", **kw):
    torch.manual_seed(0)
    return MoE(16, 24, 4, 2, router=router, **{**ROUTER_CONFIGS[router], **kw})


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16), (16,), (2, 2, 3, 16)])
def test_shape_and_dtype_preserved(shape):
    moe = make()
    x = torch.randn(shape)
    assert moe(x).shape == shape
    y = moe.bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == shape


def test_empty_input():
    moe = make()
    x = torch.randn(2, 0, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (2, 0, 16) and moe.losses == {} and moe.aux_loss is None
    assert moe.tokens_per_expert.tolist() == [0, 0, 0, 0]


def test_attributes_after_forward():
    moe = make(z_coef=1e-3, seq_balance_coef=1e-4)
    assert moe.last_routing is None and moe.aux_loss is None
    moe(torch.randn(3, 5, 16))
    r = moe.last_routing
    assert r.expert_indices.shape == (15, 2) and r.router_logits.shape == (15, 4)
    assert moe.tokens_per_expert.tolist() == r.tokens_per_expert.tolist() and int(moe.tokens_per_expert.sum()) == 30
    assert set(moe.losses) == {"balance", "seq_balance", "z"}
    expected = 0.01 * moe.losses["balance"] + 1e-4 * moe.losses["seq_balance"] + 1e-3 * moe.losses["z"]
    torch.testing.assert_close(moe.aux_loss, expected)
    moe_off = make(balance_coef=0.0)
    moe_off(torch.randn(4, 16))
    assert moe_off.aux_loss is None and "balance" in moe_off.losses


def per_token_reference(moe, x_flat):
    """A third implementation: a Python loop over tokens, each summing its experts' weighted outputs."""
    r = moe.last_routing
    rows = []
    for t in range(x_flat.shape[0]):
        y = torch.zeros(moe.d_model, dtype=x_flat.dtype)
        for slot in range(r.k):
            if r.mask is None or r.mask[t, slot]:
                e = int(r.expert_indices[t, slot])
                y = y + r.combine_weights[t, slot] * moe.experts.expert(e, x_flat[t:t + 1])[0]
        rows.append(y)
    return torch.stack(rows)


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
        assert r.tokens_per_expert.tolist() == [r.capacity] * 4 and plan.token_ids.numel() == 4 * r.capacity
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
    torch.testing.assert_close(y.reshape(T, 16), per_token_reference(moe, x.reshape(T, 16)), atol=1e-5, rtol=1e-5)


def test_expert_choice_token_without_expert_gets_zero():
    moe = make("expert_choice", capacity_factor=0.25).eval()  # C = ceil(0.25 * 12 * 2 / 4) = 2
    y = moe(torch.randn(12, 16))
    unrouted = ~moe.last_routing.mask.any(1)
    assert unrouted.sum() >= 12 - 8 and torch.all(y[unrouted] == 0)


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_grouped_equals_naive_loop(router, backend):
    moe = make(router, backend=backend, n_shared=1, d_shared=8)  # training mode: the noisy router's noise is on
    x = torch.randn(3, 7, 16, requires_grad=True)
    torch.manual_seed(1)
    y = moe(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    moe.impl = "naive"
    torch.manual_seed(1)
    y_ref = moe(x)
    grads_ref = torch.autograd.grad(y_ref, [x, *moe.parameters()], g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck_float64(activation):
    torch.manual_seed(0)
    moe = MoE(4, 6, 4, 2, activation=activation, n_shared=1, d_shared=3).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    names = ["experts.w_in", "experts.w_out", "router.gate.weight", "shared.w_in.weight"]
    params = [dict(moe.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return functional_call(moe, dict(zip(names, ps)), (x,))

    assert moe(x).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, *params))


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
    moe = make(n_shared=2, d_shared=8, shared_gate=True).eval()
    x = torch.randn(6, 16)
    shared = [FFN(16, 8) for _ in range(2)]
    with torch.no_grad():
        for i, f in enumerate(shared):  # shared expert i is rows/columns i*8 .. i*8+7 of the wide FFN
            f.w_in.weight.copy_(moe.shared.w_in.weight[i * 8:(i + 1) * 8])
            f.w_up.weight.copy_(moe.shared.w_up.weight[i * 8:(i + 1) * 8])
            f.w_out.weight.copy_(moe.shared.w_out.weight[:, i * 8:(i + 1) * 8])
    y = moe(x)
    routed = moe.experts_grouped(x, moe.last_routing)
    gate = torch.sigmoid(x @ moe.shared_gate.weight.t())
    torch.testing.assert_close(y, routed + gate * (shared[0](x) + shared[1](x)))


def test_residual_moe():
    moe = make(residual=True, d_residual=12).eval()
    with torch.no_grad():
        moe.residual_coef.bias.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(6, 16)
    y = moe(x)
    c = torch.softmax(moe.residual_coef(x), -1)
    expected = c[:, :1] * moe.residual_mlp(x) + c[:, 1:] * moe.experts_grouped(x, moe.last_routing)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("kw", [
    dict(), dict(activation="relu"), dict(router="noisy"), dict(n_shared=2, d_shared=8, shared_gate=True),
    dict(residual=True, d_residual=12), dict(router="sigmoid", n_shared=1),
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
    assert MoE(16, 32, 8, 2, n_shared=2, d_shared=32).flops_per_token() == moe_flops(16, 32, 8, 2, n_shared=2,
                                                                                       d_shared=32)
    # expert choice: k * capacity_factor experts per token on average
    assert moe_flops(16, 32, 8, 2, router="expert_choice", capacity_factor=1.5) == 2 * 16 * 8 + 3 * ffn_flops(16, 32)


@pytest.mark.parametrize("args,kw,error,match", [
    ((16, 24, 4, 5), {}, ValueError, "k must be <= num_experts=4"),
    ((16, 24, 4, 0), {}, ValueError, "k must be >= 1"),
    ((16, 24, 0, 1), {}, ValueError, "num_experts must be >= 1"),
    ((0, 24, 4, 2), {}, ValueError, "d_model must be >= 1"),
    ((16, -3, 4, 2), {}, ValueError, "d_hidden must be >= 1"),
    ((16, 24.0, 4, 2), {}, TypeError, "d_hidden must be an int"),
    ((16, 24, 4, 2), dict(router="hash"), ValueError, "router must be one of"),
    ((16, 24, 4, 2), dict(n_group=2), ValueError, "n_group applies only to router"),
    ((16, 24, 4, 2), dict(activation="tanh"), ValueError, "activation must be one of"),
    ((16, 24, 4, 2), dict(shared_gate=True), ValueError, "shared_gate=True needs shared experts"),
    ((16, 24, 4, 2), dict(residual=True, n_shared=1), ValueError, "residual=True"),
    ((16, 24, 4, 2), dict(balance_coef=-1.0), ValueError, "balance_coef must be >= 0"),
    ((16, 24, 4, 2), dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_constructor_arguments(args, kw, error, match):
    with pytest.raises(error, match=match):
        MoE(*args, **kw)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(3, 15), ValueError, "x must have last dimension 16"),
    (torch.ones(3, 16, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
    (torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
    ([[0.0] * 16], TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        make()(x)


def test_after_optimizer_step():
    moe = make("sigmoid", bias_update_rate=0.1)
    moe(torch.randn(2, 8, 16))
    moe.after_optimizer_step()
    assert moe.router.expert_bias.abs().sum() > 0
    plain = make()
    plain(torch.randn(2, 8, 16))
    plain.after_optimizer_step()  # a no-op, but callable


@pytest.mark.parametrize("router,kw", [("sigmoid", dict(seq_balance_coef=1e-3, bias_update_rate=0.01)),
                                       ("softmax", dict(z_coef=1e-3))])
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
    if router == "sigmoid":
        assert all(ffn.router.expert_bias.abs().sum() > 0 for ffn in model.ffns)
        # the last update reset the counts, and evaluation (eval mode) added none
        assert all(ffn.router.load_since_update.sum() == 0 for ffn in model.ffns)
    # the aux loss reaches the router through the loop's backward
    model.zero_grad()
    model.train()
    model(*corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(0))[:2])
    sum(ffn.aux_loss for ffn in model.ffns).backward()
    assert model.ffns[0].router.gate.weight.grad.abs().sum() > 0
