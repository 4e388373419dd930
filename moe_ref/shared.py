"""Chapter 2: the dense paths beside the routed experts: shared experts and the residual MoE.

* **Shared experts** (DeepSeekMoE :cite:p:`dai2024deepseekmoe`; Qwen2-MoE :cite:p:`yang2024qwen2`): ``num``
  FFNs that process every token, added to the routed output. Their sum is one FFN of width
  ``num * d_hidden`` (the same function, one matmul). Qwen2-MoE scales them by a learned per-token gate
  ``sigmoid(x w_gate)``.
* **Residual MoE** (DeepSpeed-MoE :cite:p:`rajbhandari2022deepspeedmoe`): ``c0 * MLP(x) + c1 * MoE(x)`` with
  ``(c0, c1) = softmax(Linear(x, 2))``, a dense MLP mixed with the routed output per token.

The mixing runs in float32 (float64 in a float64 module), like the combine it follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks
from .routing import router_float


@dataclass(frozen=True)
class SharedExpertConfig:
    """Shared experts that process every token: ``num`` FFNs of width ``d_hidden`` (default: the routed
    experts' width), computed as one FFN of width ``num * d_hidden``; with ``gate``, scaled by
    ``sigmoid(x w_gate)`` (Qwen2-MoE)."""

    num: int = 1
    d_hidden: int | None = None
    gate: bool = False

    def __post_init__(self):
        _checks.positive_int("num", self.num)
        if self.d_hidden is not None:
            _checks.positive_int("d_hidden", self.d_hidden)
        _checks.boolean("gate", self.gate)


@dataclass(frozen=True)
class ResidualConfig:
    """DeepSpeed-MoE's residual MoE: ``c0 * MLP(x) + c1 * MoE(x)``, ``(c0, c1) = softmax(Linear(x, 2))``, with
    an MLP of width ``d_hidden`` (default: the experts' width)."""

    d_hidden: int | None = None

    def __post_init__(self):
        if self.d_hidden is not None:
            _checks.positive_int("d_hidden", self.d_hidden)


def add_dense_paths(x: torch.Tensor, routed: torch.Tensor, *, shared=None, shared_gate=None, residual_mlp=None,
                    residual_coef=None) -> torch.Tensor:
    """The routed output ``routed`` ``[T, d]`` (float32) with the dense paths applied, for ``x`` ``[T, d]``.

    Each module argument is ``None`` when that path is absent.

    Args:
        x: the layer's input ``[T, d]``.
        routed: the routed experts' output ``[T, d]``.
        shared, shared_gate: the shared experts' FFN and its optional ``Linear(d, 1)`` gate.
        residual_mlp, residual_coef: the residual MoE's FFN and its ``Linear(d, 2)`` mixing coefficients.
    """
    out = routed
    if residual_mlp is not None:
        coef = torch.softmax(router_float(residual_coef(x)), dim=-1).to(out.dtype)  # [T, 2]
        out = coef[:, :1] * residual_mlp(x).to(out.dtype) + coef[:, 1:] * out
    if shared is not None:
        shared_out = shared(x).to(out.dtype)
        if shared_gate is not None:
            shared_out = torch.sigmoid(shared_gate(x).to(out.dtype)) * shared_out
        out = out + shared_out
    return out
