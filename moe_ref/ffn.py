"""Chapter 1: the dense feed-forward network (FFN) of a transformer block.

Every MoE layer in this package is a drop-in replacement for :class:`FFN`: same input and output shape
``[..., d_model]``, so the model and the training loop never need to know which one they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks

#: Activations of the plain FFN, ``act(x W1) W2``. "swiglu" is gated and listed in :data:`GATED`.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
#: Gated activations, ``(act(x W_gate) * (x W_up)) W_down`` (Shazeer 2020), mapped to their gate activation.
GATED = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


def activation_fn(name: str):
    """Return ``(act, gated)`` for an activation name: the elementwise function and whether it is gated."""
    _checks.choice("activation", name, (*ACTIVATIONS, *GATED))
    return (GATED[name], True) if name in GATED else (ACTIVATIONS[name], False)


class FFN(nn.Module):
    """Position-wise feed-forward network: ``[..., d_model] -> [..., d_model]``.

    Plain form (``activation`` in "relu", "gelu", "silu"): ``act(x @ W_in) @ W_out``, two matrices.
    Gated form (``activation`` in "swiglu", "geglu", "reglu"): ``(act(x @ W_gate) * (x @ W_up)) @ W_out``,
    three matrices (Shazeer 2020, used by LLaMA, Mixtral, DeepSeek, Qwen).

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
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.activation = activation
        self.act, self.gated = activation_fn(activation)
        self.bias = bias
        self.w_in = nn.Linear(d_model, d_hidden, bias=bias)
        self.w_up = nn.Linear(d_model, d_hidden, bias=bias) if self.gated else None
        self.w_out = nn.Linear(d_hidden, d_model, bias=bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activations ``[..., d_hidden]`` (after the nonlinearity and the gate): what chapter 1 probes."""
        h = self.act(self.w_in(x))
        return h * self.w_up(x) if self.gated else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_model]`` floating point. Returns ``[..., d_model]`` of the same dtype."""
        _checks.float_tensor("x", x, last_dim=self.d_model)
        return self.w_out(self.hidden(x))

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (see :mod:`moe_ref.counting` for the convention)."""
        from .counting import ffn_flops  # local import: counting imports this module

        return ffn_flops(self.d_model, self.d_hidden, self.activation)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, bias={self.bias}"
