import math

import pytest
import torch
import torch.nn.functional as F

from moe_ref import FFN, count_params, ffn_flops, ffn_params


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "reglu", "gelu", "relu", "silu"])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (1, 1, 1, 16)])
def test_shape_and_dtype(activation, shape):
    ffn = FFN(16, 24, activation)
    x = torch.randn(*shape)
    y = ffn(x)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_gated_matches_hand_written_swiglu():
    torch.manual_seed(0)
    ffn = FFN(8, 12, "swiglu").double()
    x = torch.randn(4, 8, dtype=torch.float64)
    a, b, c = ffn.w_in.weight, ffn.w_up.weight, ffn.w_out.weight  # [12, 8], [12, 8], [8, 12]
    expected = torch.empty(4, 8, dtype=torch.float64)
    a, b, c = a.detach(), b.detach(), c.detach()
    for t in range(4):
        for o in range(8):
            acc = 0.0
            for j in range(12):
                g = float(a[j] @ x[t])
                acc += float(c[o, j]) * (g / (1 + math.exp(-g))) * float(b[j] @ x[t])
            expected[t, o] = acc
    torch.testing.assert_close(ffn(x), expected)


def test_plain_relu_matches_functional():
    ffn = FFN(8, 12, "relu", bias=True)
    x = torch.randn(3, 8)
    expected = F.linear(F.relu(F.linear(x, ffn.w_in.weight, ffn.w_in.bias)), ffn.w_out.weight, ffn.w_out.bias)
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.w_up is None


@pytest.mark.parametrize("activation,bias,expected", [
    # hand-computed: d=10, h=7
    ("swiglu", False, 3 * 10 * 7),
    ("swiglu", True, 3 * 10 * 7 + 2 * 7 + 10),
    ("relu", False, 2 * 10 * 7),
    ("gelu", True, 2 * 10 * 7 + 7 + 10),
])
def test_param_count(activation, bias, expected):
    assert ffn_params(10, 7, activation, bias) == expected
    assert count_params(FFN(10, 7, activation, bias)) == expected


def test_flops_hand_computed():
    # d_model=4096, d_hidden=14336 (Mixtral's expert): 3 matmuls * 2 FLOPs per multiply-add
    assert ffn_flops(4096, 14336, "swiglu") == 2 * 3 * 4096 * 14336 == 352_321_536
    assert ffn_flops(768, 3072, "gelu") == 2 * 2 * 768 * 3072
    assert FFN(768, 3072, "gelu").flops_per_token() == 9_437_184


def test_flops_match_profiler():
    # An independent count: torch's own FLOP counter over the module's matmuls.
    from torch.utils.flop_counter import FlopCounterMode

    for activation in ("swiglu", "relu"):
        ffn = FFN(32, 48, activation)
        x = torch.randn(10, 32)
        with FlopCounterMode(display=False) as counter:
            ffn(x)
        assert counter.get_total_flops() == 10 * ffn.flops_per_token()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(d_model=0, d_hidden=4), ValueError, "d_model"),
    (dict(d_model=4, d_hidden=-1), ValueError, "d_hidden"),
    (dict(d_model=4.0, d_hidden=4), TypeError, "d_model"),
    (dict(d_model=4, d_hidden=4, activation="tanh"), ValueError, "activation"),
    (dict(d_model=4, d_hidden=4, bias="yes"), TypeError, "bias"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FFN(**kwargs)


def test_bad_input():
    ffn = FFN(8, 16)
    with pytest.raises(ValueError, match="last dimension 8"):
        ffn(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        ffn(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        ffn(torch.tensor(1.0))
