"""Every public entry point refuses bad input with a ValueError or TypeError that names the argument.

Each case is (what is called, the exception, a pattern the message must contain). Before the restructure
several of these raised a raw AttributeError, IndexError or RuntimeError from inside torch.
"""

from __future__ import annotations

import pytest
import torch

import moe_ref
from moe_ref import (AuxLossConfig, CapacityConfig, FFN, MoE, ResidualConfig, RouterConfig, SharedExpertConfig,
                     apply_capacity, expert_capacity, expert_choice, grouped_mm, load_balancing_loss, make_router,
                     queue_positions, sigmoid_grouped_topk, softmax_topk)
from moe_ref.dispatch import combine, permute, sort_by_expert


def _moe():
    torch.manual_seed(0)
    return MoE(16, 24, 4, 2)


def _routing():
    return _moe().router(torch.randn(5, 16))


i32 = torch.int32
CASES = {
    # the layer and its configuration
    "x not a tensor": (lambda: _moe()([1.0] * 16), TypeError, "x must be a torch.Tensor"),
    "x integer": (lambda: _moe()(torch.ones(3, 16, dtype=torch.long)), TypeError, "x must be a floating-point"),
    "x wrong width": (lambda: _moe()(torch.randn(3, 15)), ValueError, "x must have last dimension 16"),
    "x float32, module float64": (lambda: _moe().double()(torch.randn(3, 16)), TypeError, "x has dtype"),
    "x on another device": (lambda: _moe()(torch.randn(3, 16, device="meta")), ValueError, "x is on meta"),
    "token_mask float": (lambda: _moe()(torch.randn(3, 16), torch.ones(3)), TypeError, "token_mask must be a bool"),
    "token_mask shape": (lambda: _moe()(torch.randn(2, 3, 16), torch.ones(3, 2, dtype=torch.bool)), ValueError,
                         "token_mask must have shape"),
    "k > E": (lambda: MoE(16, 24, 4, 5), ValueError, "k must be <= num_experts"),
    "router kind": (lambda: MoE(16, 24, 4, 2, router="topk"), ValueError, "kind must be one of"),
    "router type": (lambda: MoE(16, 24, 4, 2, router=3), TypeError, "router must be a RouterConfig"),
    "router option of another kind": (lambda: RouterConfig("softmax", n_group=2), ValueError,
                                      "n_group applies only to router kinds"),
    "groups do not divide E": (lambda: MoE(16, 24, 6, 2, router=RouterConfig("sigmoid", n_group=4)), ValueError,
                               "n_group must divide"),
    "jitter >= 1": (lambda: RouterConfig(jitter_noise=1.0), ValueError, "jitter_noise must be < 1"),
    "capacity not a config": (lambda: MoE(16, 24, 4, 2, capacity=1.25), TypeError, "capacity must be a CapacityConfig"),
    "capacity with expert choice": (lambda: MoE(16, 24, 4, 2, router="expert_choice",
                                                capacity=CapacityConfig(capacity_factor=1.0)), ValueError,
                                    "capacity applies to token-choice routers"),
    "capacity factor and capacity": (lambda: CapacityConfig(capacity_factor=1.0, capacity=3), ValueError,
                                     "exactly one of capacity_factor and capacity"),
    "capacity group": (lambda: CapacityConfig(capacity_factor=1.0, group="device"), ValueError, "group must be"),
    "drop priority": (lambda: CapacityConfig(capacity=2, drop_priority="random"), ValueError, "drop_priority"),
    "negative coefficient": (lambda: AuxLossConfig(z_coef=-1e-3), ValueError, "z_coef must be >= 0"),
    "shared and residual": (lambda: MoE(16, 24, 4, 2, shared=SharedExpertConfig(), residual=ResidualConfig()),
                            ValueError, "use it or shared, not both"),
    "no shared experts": (lambda: SharedExpertConfig(num=0), ValueError, "num must be >= 1"),
    "impl": (lambda: MoE(16, 24, 4, 2, impl="fast"), ValueError, "impl must be one of"),
    "backend": (lambda: MoE(16, 24, 4, 2, backend="cuBLAS"), ValueError, "backend must be one of"),
    "activation": (lambda: MoE(16, 24, 4, 2, activation="tanh"), ValueError, "activation must be one of"),
    # routing rules and routers
    "logits 1-d": (lambda: softmax_topk(torch.randn(4), 1, norm_topk_prob=True), ValueError, "logits must have"),
    "k > E in a rule": (lambda: softmax_topk(torch.randn(4, 3), 4, norm_topk_prob=True), ValueError, "k must be <="),
    "bias shape": (lambda: sigmoid_grouped_topk(torch.randn(4, 4), 2, expert_bias=torch.zeros(3)), ValueError,
                   "expert_bias must be a [E]"),
    "expert choice capacity": (lambda: expert_choice(torch.randn(4, 3), 5), ValueError, "capacity must be <="),
    "router 3-d input": (lambda: _moe().router(torch.randn(1, 5, 16)), ValueError, "x must be [T, d_model]"),
    "router mask shape": (lambda: _moe().router(torch.randn(5, 16), torch.ones(4, dtype=torch.bool)), ValueError,
                          "token_mask must have shape"),
    "make_router": (lambda: make_router(5, 16, 4, 2), TypeError, "router must be a RouterConfig"),
    # capacity, dispatch, experts, kernels, losses
    "capacity 0": (lambda: expert_capacity(8, 4, 2, capacity=0), ValueError, "capacity must be >= 1"),
    "group size": (lambda: apply_capacity(_routing(), 2, group_size=3), ValueError, "group_size must divide"),
    "apply_capacity routing": (lambda: apply_capacity("routing", 2, group_size=1), TypeError,
                               "routing must be a Routing"),
    "queue_positions indices": (lambda: queue_positions(torch.zeros(4, 2), 4, group_size=1), TypeError,
                                "expert_indices must be a [T, k] int64"),
    "sort routing": (lambda: sort_by_expert("x"), TypeError, "routing must be a Routing"),
    "sort capacity": (lambda: sort_by_expert(_routing(), 3), TypeError, "capacity must be a CapacityRecord"),
    "permute rows": (lambda: permute(torch.randn(4, 16), sort_by_expert(_routing())), ValueError,
                     "x must be [T, d] with T=5"),
    "combine rows": (lambda: combine(torch.randn(3, 16), sort_by_expert(_routing())), ValueError,
                     "y_sorted must be [A, d] with A=10"),
    "combine num_tokens": (lambda: combine(torch.randn(10, 16), sort_by_expert(_routing()), 6), ValueError,
                           "num_tokens must be the plan's T=5"),
    "expert index": (lambda: _moe().experts.expert(4, torch.randn(3, 16)), ValueError, "e must be < num_experts"),
    "grouped_mm offsets end": (lambda: grouped_mm(torch.randn(5, 4), torch.randn(2, 4, 3),
                                                  torch.tensor([2, 4], dtype=i32)), ValueError, "offsets[-1]"),
    "grouped_mm offsets dtype": (lambda: grouped_mm(torch.randn(5, 4), torch.randn(2, 4, 3),
                                                    torch.tensor([2.0, 5.0])), TypeError, "offsets must be an integer"),
    "grouped_mm float64 torch": (lambda: grouped_mm(torch.randn(5, 4).double(), torch.randn(2, 4, 3).double(),
                                                    torch.tensor([2, 5], dtype=i32), backend="torch"), ValueError,
                                 "backend='torch' cannot run dtype torch.float64 on device cpu"),
    "loss mask": (lambda: load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 2, dtype=torch.long),
                                              attention_mask=torch.ones(3)), ValueError, "attention_mask must have"),
    "FFN input": (lambda: FFN(16, 32)(torch.randn(3, 8)), ValueError, "x must have last dimension 16"),
    "from_hf": (lambda: moe_ref.from_hf(torch.nn.Linear(3, 3)), TypeError, "from_hf does not support Linear"),
    "train config": (lambda: moe_ref.book.train(None, None, "cfg"), TypeError, "config must be a TrainConfig"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named(case):
    call, error, pattern = CASES[case]
    with pytest.raises(error) as info:
        call()
    assert pattern in str(info.value), str(info.value)
