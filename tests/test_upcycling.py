"""Sparse upcycling: at step 0 the MoE computes the dense FFN exactly; then the copies can diverge."""

import copy

import pytest
import torch

from moe_ref.ffn import FFN
from moe_ref.routers import RouterConfig
from moe_ref.upcycling import upcycle
from moe_ref.book.model import ModelConfig, TinyTransformer


def dense_reference(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    """The FFN by hand, in float64, token by token: w_out (act(w_in x) [* w_up x])."""
    w_in = ffn.w_in.weight.double()
    w_out = ffn.w_out.weight.double()
    w_up = None if ffn.w_up is None else ffn.w_up.weight.double()
    rows = []
    for token in x.double():
        h = w_in @ token
        if ffn.activation == "relu":
            h = torch.clamp(h, min=0)
        else:  # swiglu
            h = h * torch.sigmoid(h) * (w_up @ token)
        rows.append(w_out @ h)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("num_experts,k", [(2, 2), (4, 2), (8, 2), (8, 3)])
def test_step_zero_reproduces_dense(activation, num_experts, k):
    torch.manual_seed(0)
    ffn = FFN(16, 24, activation)
    moe = upcycle(ffn, num_experts, k)
    x = torch.randn(50, 16)
    expected = dense_reference(ffn, x)
    torch.testing.assert_close(moe(x).double(), expected, atol=1e-5, rtol=1e-5)
    # the router is fresh, yet the routing does not matter: every token still gets k experts
    assert moe.last_routing.expert_indices.shape == (50, k)


def test_model_logits_unchanged():
    torch.manual_seed(1)
    config = ModelConfig(block_size=16, d_model=32, n_layers=2, n_heads=4, d_hidden=64, activation="relu")
    dense = TinyTransformer(config)
    sparse = copy.deepcopy(dense)
    for block in sparse.blocks:
        block.ffn = upcycle(block.ffn, 4, 2)
    idx = torch.randint(256, (3, 16))
    torch.testing.assert_close(sparse(idx)[0], dense(idx)[0], atol=1e-5, rtol=1e-5)
    assert sparse.num_params() > dense.num_params()


def test_copies_diverge_after_training():
    torch.manual_seed(2)
    moe = upcycle(FFN(8, 16, "relu"), 4, 2)
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.1)
    x = torch.randn(64, 8)
    for _ in range(3):
        optimizer.zero_grad()
        (moe(x) - x).pow(2).mean().backward()
        optimizer.step()
    w = moe.experts.w_in
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert max((w[e] - w[0]).abs().max().item() for e in range(1, 4)) > 0


def test_sigmoid_router_and_dtype():
    ffn = FFN(8, 16, "relu").double()
    moe = upcycle(ffn, 4, 2, router="sigmoid")
    assert moe.experts.w_in.dtype == torch.float64
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x), ffn(x))


@pytest.mark.parametrize("call,exc,word", [
    (lambda f: upcycle(f, 4, 1), ValueError, "k"),
    (lambda f: upcycle(f, 4, 2, router=RouterConfig("softmax", norm_topk_prob=False)), ValueError,
     "norm_topk_prob"),
    (lambda f: upcycle(f, 4, 2, router="expert_choice"), ValueError, "router"),
    (lambda f: upcycle(torch.nn.Linear(8, 8), 4, 2), TypeError, "ffn"),
    (lambda f: upcycle(FFN(8, 16, "relu", bias=True), 4, 2), ValueError, "bias"),
    (lambda f: upcycle(f, 4, 5), ValueError, "k"),
])
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call(FFN(8, 16, "relu"))
