"""Parameter and FLOP counting, by formula, for FFNs, attention and whole models.

Convention (as in Kaplan et al. 2020 and Hoffmann et al. 2022): a FLOP count is the number of floating-point
operations of the matrix multiplications of one *forward* pass, per token, with a multiply-add counted as
2 FLOPs. Elementwise work (activations, the gate product, biases, norms, softmax) is left out: it is
bandwidth-bound and under 1% of the matmul FLOPs at the sizes in this book. A training step (forward plus
backward) costs about 3 times the forward FLOPs.
"""

from __future__ import annotations

from torch import nn

from . import _checks
from .ffn import activation_fn


def count_params(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (each shared tensor counted once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def ffn_params(d_model: int, d_hidden: int, activation: str = "swiglu", bias: bool = False) -> int:
    """Parameters of one :class:`~moe_ref.FFN`: ``n_mat * d_model * d_hidden`` plus biases.

    ``n_mat`` is 3 for the gated activations (gate, up, down) and 2 for the plain ones (in, out).
    """
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_hidden", d_hidden)
    _, gated = activation_fn(activation)
    n_in = 2 if gated else 1
    weights = (n_in + 1) * d_model * d_hidden
    biases = (n_in * d_hidden + d_model) if bias else 0
    return weights + biases


def ffn_flops(d_model: int, d_hidden: int, activation: str = "swiglu") -> int:
    """Forward matmul FLOPs per token of one FFN: ``2 * n_mat * d_model * d_hidden``."""
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_hidden", d_hidden)
    _, gated = activation_fn(activation)
    return 2 * (3 if gated else 2) * d_model * d_hidden


def attention_flops(d_model: int, context: int) -> int:
    """Forward matmul FLOPs per token of one causal self-attention layer at context length ``context``.

    ``8 d^2`` for the Q, K, V and output projections plus ``4 * context * d`` for the scores ``QK^T`` and the
    weighted sum of values, counting the full context as Kaplan et al. (2020) do (causal masking would halve
    the second term on average; kernels that skip masked blocks realise part of that).
    """
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("context", context)
    return 8 * d_model * d_model + 4 * context * d_model
