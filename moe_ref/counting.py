"""Parameter and FLOP counting, by formula, for FFNs, attention and whole models.

Convention: a FLOP count is the number of floating-point operations of the matrix multiplications of one
*forward* pass, per token, with a multiply-add counted as 2 FLOPs, as in :cite:t:`kaplan2020scaling`
(Table 1) and :cite:t:`hoffmann2022chinchilla` (Appendix F). Elementwise work (activations, the gate
product, biases, norms, softmax) is left out: it is bandwidth-bound and under 1% of the matmul FLOPs at the
sizes in this book. A training step (forward plus backward) costs about 3 times the forward FLOPs (both
papers count the backward pass as twice the forward).

The two papers differ on attention's context-dependent term; :func:`attention_flops` uses Hoffmann et al.'s
(see there).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from . import _checks
from .activations import activation_fn


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
    """Parameters of one :class:`~moe_ref.ffn.FFN`: ``n_mat * d_model * d_hidden`` plus biases.

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

    ``8 d^2`` for the Q, K, V and output projections plus ``4 * context * d`` for the scores ``QK^T``
    (``2 * context * d``) and the weighted sum of values (another ``2 * context * d``), both over the full
    context, with ``d = d_model`` also the attention width (heads times head size). This is the count of
    :cite:t:`hoffmann2022chinchilla` (Appendix F) without their softmax term. Causal masking would halve the
    second term on average; kernels that skip masked blocks realise part of that.

    :cite:t:`kaplan2020scaling` (Table 1) count half of that context term, ``2 * n_ctx * d_attn`` per layer
    (their forward total is ``C_forward = 2N + 2 n_layer n_ctx d_attn``, ``N`` the non-embedding
    parameters); their projection term is the same ``8 d^2``.
    """
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("context", context)
    return 8 * d_model * d_model + 4 * context * d_model


# --- Mixture-of-Experts layers (chapter 2) ------------------------------------------------------------------

class MoEParams(NamedTuple):
    """Parameter counts of an MoE layer: ``total`` stored, ``active`` used by one token."""

    total: int
    active: int


def _moe_parts(d_model: int, d_hidden: int, num_experts: int, k: int, activation: str, router: str,
               n_shared: int, d_shared: int | None, shared_gate: bool, residual: bool, d_residual: int | None,
               capacity_factor: float):
    """The pieces shared by :func:`moe_params` and :func:`moe_flops`, checked."""
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("d_hidden", d_hidden)
    _checks.positive_int("num_experts", num_experts)
    _checks.positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
    _checks.choice("router", router, ("softmax", "noisy", "sigmoid", "expert_choice"))
    _checks.positive_int("n_shared", n_shared, minimum=0)
    d_shared = d_hidden if d_shared is None else _checks.positive_int("d_shared", d_shared)
    d_residual = d_hidden if d_residual is None else _checks.positive_int("d_residual", d_residual)
    _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
    activation_fn(activation)
    # experts a token uses: k, or on average k * capacity_factor for expert choice (E * C / T)
    experts_per_token = k * capacity_factor if router == "expert_choice" else k
    return d_shared, d_residual, experts_per_token


def moe_params(d_model: int, d_hidden: int, num_experts: int, k: int, activation: str = "swiglu", *,
               router: str = "softmax", n_shared: int = 0, d_shared: int | None = None, shared_gate: bool = False,
               residual: bool = False, d_residual: int | None = None, capacity_factor: float = 1.0) -> MoEParams:
    """Total and active parameters of a :class:`~moe_ref.moe.MoE` layer with the same arguments.

    * router: ``d_model * E`` (twice that for the noisy router's noise projection);
    * routed experts: ``E`` bias-free FFNs of width ``d_hidden``, of which ``k`` are active (``k *
      capacity_factor`` on average for expert choice, rounded);
    * shared experts: one FFN of width ``n_shared * d_shared`` (the sum of ``n_shared`` experts), plus
      ``d_model`` for the sigmoid gate of ``shared_gate``;
    * residual MoE: a dense FFN of width ``d_residual`` and the ``Linear(d_model, 2)`` mixing coefficients.

    Everything except the routed experts is active for every token. Buffers (the sigmoid router's bias)
    are not parameters.
    """
    d_shared, d_residual, experts_per_token = _moe_parts(
        d_model, d_hidden, num_experts, k, activation, router, n_shared, d_shared, shared_gate, residual,
        d_residual, capacity_factor)
    expert = ffn_params(d_model, d_hidden, activation)
    always = d_model * num_experts * (2 if router == "noisy" else 1)
    if n_shared:
        always += ffn_params(d_model, n_shared * d_shared, activation) + (d_model if shared_gate else 0)
    if residual:
        always += ffn_params(d_model, d_residual, activation) + 2 * d_model + 2
    return MoEParams(total=always + num_experts * expert, active=always + round(experts_per_token * expert))


def moe_flops(d_model: int, d_hidden: int, num_experts: int, k: int, activation: str = "swiglu", *,
              router: str = "softmax", n_shared: int = 0, d_shared: int | None = None, shared_gate: bool = False,
              residual: bool = False, d_residual: int | None = None, capacity_factor: float = 1.0) -> int:
    """Forward matmul FLOPs per token of a :class:`~moe_ref.moe.MoE` layer: only the *active* experts count.

    ``2 * d_model * E`` for the router (doubled for the noisy router), ``k`` expert FFNs (``k *
    capacity_factor`` on average for expert choice, rounded), the shared FFN of width ``n_shared * d_shared``
    and its gate ``2 * d_model``, and for the residual MoE its dense FFN and ``2 * d_model * 2`` for its
    coefficients. The sorting, gathering and weighted sums of dispatch are not matmuls and are left out.
    """
    d_shared, d_residual, experts_per_token = _moe_parts(
        d_model, d_hidden, num_experts, k, activation, router, n_shared, d_shared, shared_gate, residual,
        d_residual, capacity_factor)
    total = 2 * d_model * num_experts * (2 if router == "noisy" else 1)
    total += round(experts_per_token * ffn_flops(d_model, d_hidden, activation))
    if n_shared:
        total += ffn_flops(d_model, n_shared * d_shared, activation) + (2 * d_model if shared_gate else 0)
    if residual:
        total += ffn_flops(d_model, d_residual, activation) + 2 * d_model * 2
    return total


def dispatch_bytes(d_model: int, k: int, bytes_per_element: float = 2, *, remote_fraction: float = 1.0) -> float:
    """Bytes one token sends through an expert-parallel all-to-all *each way*, per MoE layer and forward pass.

    Dispatch sends each of the token's ``k`` rows of ``d_model`` elements to its expert's rank, and combine
    brings ``k`` rows back: ``k * d_model * bytes_per_element`` each way, ``2 * k * d_model * bytes`` in all
    (the backward pass moves the same again). ``remote_fraction`` is the share of rows whose expert is on
    another rank, ``(W - 1) / W`` under uniform routing over ``W`` ranks; rows for local experts cost nothing.
    """
    _checks.positive_int("d_model", d_model)
    _checks.positive_int("k", k)
    _checks.finite_float("bytes_per_element", bytes_per_element, minimum=0.0, strict=True)
    _checks.finite_float("remote_fraction", remote_fraction, minimum=0.0)
    if remote_fraction > 1:
        raise ValueError(f"remote_fraction must be <= 1, got {remote_fraction}")
    return k * d_model * bytes_per_element * remote_fraction
