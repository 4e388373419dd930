"""Shared helpers of the tests: an independent float64 reference for the MoE layer, and small builders.

The reference below never calls the package's expert, dispatch, capacity or combine code: it reads the
weights off the module and the routing decisions off ``moe.last_routing`` / ``moe.last_capacity`` (routing is
tested on its own, against hand-computed cases, in ``test_routing.py``), then loops over tokens in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

_GATE = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}
_PLAIN = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def ffn64(x, w_in, w_up, w_out, activation):
    """One FFN in float64 from weight matrices stored input-major (``x @ w``)."""
    x, w_in, w_out = x.double(), w_in.double(), w_out.double()
    if activation in _GATE:
        h = _GATE[activation](x @ w_in) * (x @ w_up.double())
    else:
        h = _PLAIN[activation](x @ w_in)
    return h @ w_out


def linear_ffn64(ffn, x):
    """A :class:`moe_ref.FFN` (nn.Linear weights, ``[out, in]``) in float64."""
    w_up = None if ffn.w_up is None else ffn.w_up.weight.t()
    return ffn64(x, ffn.w_in.weight.t(), w_up, ffn.w_out.weight.t(), ffn.activation)


@torch.no_grad()
def reference_output(moe, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE's output for ``x`` in float64, token by token, from the routing of its *last* forward on ``x``.

    Every (token, slot) pair the router made counts unless it is padding or was dropped by the capacity
    (``moe.last_capacity.dropped``); its expert's FFN output is weighted by the combine weight. Then the
    dense paths: residual MoE mixing or shared experts.
    """
    r, c = moe.last_routing, moe.last_capacity
    ex = moe.experts
    x_flat = x.detach().reshape(-1, moe.d_model).double()
    T = x_flat.shape[0]
    real = torch.ones(T, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1).bool().cpu()
    out = torch.zeros(T, moe.d_model, dtype=torch.float64)
    for t in range(T):
        for j in range(r.expert_indices.shape[1]):
            if not real[t] or (r.mask is not None and not r.mask[t, j]):
                continue
            if c is not None and c.dropped[t, j]:
                continue
            e = int(r.expert_indices[t, j])
            w_up = None if ex.w_up is None else ex.w_up[e]
            y = ffn64(x_flat[t:t + 1], ex.w_in[e], w_up, ex.w_out[e], ex.activation)
            out[t] += float(r.combine_weights[t, j]) * y[0]
    if moe.residual_mlp is not None:
        coef = torch.softmax(x_flat @ moe.residual_coef.weight.double().t() + moe.residual_coef.bias.double(), -1)
        out = coef[:, :1] * linear_ffn64(moe.residual_mlp, x_flat) + coef[:, 1:] * out
    if moe.shared is not None:
        shared = linear_ffn64(moe.shared, x_flat)
        if moe.shared_gate is not None:
            shared = torch.sigmoid(x_flat @ moe.shared_gate.weight.double().t()) * shared
        out = out + shared
    return out.reshape(x.shape)


def assert_every_drop_counted(moe, token_mask: torch.Tensor | None = None) -> None:
    """The layer's drop count equals the pairs the router made (padding excluded) minus those computed."""
    r, c = moe.last_routing, moe.last_capacity
    assigned = int(r.tokens_per_expert.sum())
    computed = assigned if c is None else int(c.keep.sum())
    assert moe.num_dropped == assigned - computed
    if c is not None:
        assert bool((c.keep & c.dropped).any()) is False
        assert int(c.keep.sum()) + int(c.dropped.sum()) == assigned


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


def close64(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``actual`` (any float dtype) against a float64 ``expected``, with a tolerance for ``dtype``."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


__all__ = ["ffn64", "linear_ffn64", "reference_output", "assert_every_drop_counted", "close64"]
