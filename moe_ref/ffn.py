"""Chapter 1: the dense feed-forward network (FFN) of a transformer block, and the FFN formula itself.

Every MoE layer in this package is a drop-in replacement for :class:`FFN`: same input and output shape
``[..., d_model]``, so a model never needs to know which one it holds. The formula is written once, in
:func:`ffn_hidden` and :func:`ffn_forward`, with the matrix product passed in: an ``nn.Linear`` for the
dense FFN, a grouped matmul, a batched matmul or a plain ``@`` for the experts (:mod:`moe_ref.experts`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import _checks
from .activations import activation_fn
from .counting import ffn_flops


def ffn_hidden(x, act: Callable, w_in, w_up, matmul: Callable) -> torch.Tensor:
    """The hidden activations: ``act(x W_in)``, times ``x W_up`` in the gated form (``w_up`` not ``None``).

    ``matmul(a, w)`` computes ``a W``; the weights are whatever it takes.
    """
    hidden = act(matmul(x, w_in))
    return hidden if w_up is None else hidden * matmul(x, w_up)


def ffn_forward(x, act: Callable, w_in, w_up, w_out, matmul: Callable) -> torch.Tensor:
    """The FFN ``ffn_hidden(x) W_out``, with ``matmul`` as in :func:`ffn_hidden`."""
    return matmul(ffn_hidden(x, act, w_in, w_up, matmul), w_out)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return layer(x)


class FFN(nn.Module):
    """Position-wise feed-forward network: ``[..., d_model] -> [..., d_model]``.

    Plain form (``activation`` in "relu", "gelu", "silu"): ``act(x @ W_in) @ W_out``, two matrices.
    Gated form (``activation`` in "swiglu", "geglu", "reglu"): ``(act(x @ W_gate) * (x @ W_up)) @ W_out``,
    three matrices :cite:p:`shazeer2020glu`, as in LLaMA, Mixtral, DeepSeek and Qwen.

    Args:
        d_model: width of the residual stream.
        d_hidden: width of the hidden layer (the "intermediate size").
        activation: one of ``"swiglu"`` (default), ``"geglu"``, ``"reglu"``, ``"gelu"``, ``"relu"``, ``"silu"``.
        bias: add a bias to every projection.

    Attributes:
        w_in: ``nn.Linear(d_model, d_hidden)``; the gate projection in the gated form.
        w_up: ``nn.Linear(d_model, d_hidden)`` in the gated form, ``None`` otherwise.
        w_out: ``nn.Linear(d_hidden, d_model)``.
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.bias = _checks.boolean("bias", bias)
        self.activation = activation
        self.act, self.gated = activation_fn(activation)
        self.w_in = nn.Linear(d_model, d_hidden, bias=bias)
        self.w_up = nn.Linear(d_model, d_hidden, bias=bias) if self.gated else None
        self.w_out = nn.Linear(d_hidden, d_model, bias=bias)

    def reset_parameters(self) -> None:
        """Re-initialise every projection as ``nn.Linear`` does."""
        for layer in (self.w_in, self.w_up, self.w_out):
            if layer is not None:
                layer.reset_parameters()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activations ``[..., d_hidden]`` (after the nonlinearity and the gate): what chapter 1 probes."""
        return ffn_hidden(x, self.act, self.w_in, self.w_up, _linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_model]`` floating point. Returns ``[..., d_model]`` of the same dtype."""
        _checks.float_tensor("x", x, last_dim=self.d_model)
        _checks.matches_module("x", x, self.w_in.weight)
        return self.w_out(self.hidden(x))

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (see :mod:`moe_ref.counting` for the convention)."""
        return ffn_flops(self.d_model, self.d_hidden, self.activation)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, bias={self.bias}"
