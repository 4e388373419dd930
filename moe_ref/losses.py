"""Chapter 3: auxiliary losses of the router: load balance and logit size.

All three losses are returned *unweighted*; the MoE layer multiplies them by its coefficients. They are
computed in float32 (float64 for float64 inputs).

* :func:`load_balancing_loss`: ``E * sum_i f_i P_i``
  :cite:p:`shazeer2017outrageously,lepikhin2021gshard,fedus2022switch`, normalised to 1 at perfect balance
  for any ``k``.
* :func:`router_z_loss`: mean squared log-partition of the router logits (ST-MoE :cite:p:`zoph2022stmoe`).
* :func:`sequence_balance_loss`: DeepSeek-V3's balance loss computed per sequence :cite:p:`deepseekv3`.

Every loss takes a padding mask (``attention_mask``, 1 for real tokens), so padding never counts.

**How the MoE layer uses them.** :class:`AuxLossConfig` holds the coefficients. The layer computes a loss
only when its coefficient is above 0 and gradients are on (or when asked for the statistic), and attaches
the weighted sum to its output with :func:`attach_aux_loss`, an identity whose backward also sends a
gradient of 1 (times :attr:`AuxLossConfig.scale`) into the loss, as Megatron-LM's ``MoEAuxLossAutoScaler``
does. The gradient of the auxiliary loss then flows in the same backward as the language-model loss: no
training loop has to collect it, no graph-carrying tensor is kept on the module, and a forward recomputed
by activation checkpointing contributes it exactly once (only the graph that backward traverses counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks
from .routing import router_float

#: The names of the auxiliary losses, as keys of ``MoE.losses``.
LOSS_NAMES = ("balance", "seq_balance", "z")


@dataclass(frozen=True)
class AuxLossConfig:
    """Coefficients of the auxiliary losses of an MoE layer (each 0 turns that loss off).

    Attributes:
        balance_coef: :func:`load_balancing_loss`, per layer. ``transformers``' ``router_aux_loss_coef``
            multiplies ONE loss pooled over all ``L`` MoE layers, which is ``k`` times this loss; so
            ``balance_coef = k * router_aux_loss_coef / L``, exactly when the layers carry the same load
            (chapter 3 checks this against ``load_balancing_loss_func``).
        seq_balance_coef: :func:`sequence_balance_loss` (DeepSeek-V3's ``alpha``).
        z_coef: :func:`router_z_loss` (``router_z_loss_coef``; ST-MoE uses 0.001).
        compute_all: also compute the losses whose coefficient is 0, and compute them without gradients
            (eval), as statistics in ``MoE.losses``.
        scale: multiplies the gradient the losses send back: set it to what multiplies your main loss before
            backward (``1 / gradient_accumulation_steps``, a loss scaler's scale), as Megatron-LM's
            ``set_loss_scale``.
    """

    balance_coef: float = 0.01
    seq_balance_coef: float = 0.0
    z_coef: float = 0.0
    compute_all: bool = False
    scale: float = 1.0

    def __post_init__(self):
        for name in ("balance_coef", "seq_balance_coef", "z_coef", "scale"):
            _checks.finite_float(name, getattr(self, name), minimum=0.0)
        _checks.boolean("compute_all", self.compute_all)

    def coef(self, name: str) -> float:
        """The coefficient of loss ``name`` (one of :data:`LOSS_NAMES`)."""
        return getattr(self, f"{name}_coef")


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; its backward also returns ``scale`` as the gradient of the scalar ``aux_loss``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux_loss.shape, aux_loss.dtype, aux_loss.device
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=ctx.aux_device)
        return grad_out, grad_aux, None


def attach_aux_loss(out: torch.Tensor, aux_loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``out`` unchanged, with the gradient of the scalar ``aux_loss`` (times ``scale``) attached to it.

    Whatever backward reaches ``out`` also back-propagates ``aux_loss``, once per backward pass through
    ``out``: a caller that differentiates one forward several times (``retain_graph=True``, ``gradcheck``,
    Jacobians) gets it each time. A no-op when ``aux_loss`` does not require a gradient.
    """
    if not aux_loss.requires_grad:
        return out
    return _AttachAuxLoss.apply(out, aux_loss, scale)


def _check_routing_pair(probs, expert_indices, probs_name: str = "router_probs") -> None:
    _checks.float_tensor(probs_name, probs, min_dim=2)
    if not isinstance(expert_indices, torch.Tensor) or expert_indices.dtype != torch.int64:
        got = getattr(expert_indices, "dtype", type(expert_indices).__name__)
        raise TypeError(f"expert_indices must be an int64 tensor, got {got}")
    if expert_indices.shape[:-1] != probs.shape[:-1]:
        raise ValueError(f"expert_indices {tuple(expert_indices.shape)} and {probs_name} {tuple(probs.shape)} "
                         f"must agree on all but the last dimension")


def _token_mask(attention_mask, shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor | None:
    """The padding mask as float32 ``[T]`` (1 for real tokens), or ``None``."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.numel() != shape.numel():
        raise ValueError(f"attention_mask must have one entry per token ({shape.numel()}), "
                         f"got shape {tuple(attention_mask.shape)}")
    return attention_mask.reshape(-1).to(device=device, dtype=dtype)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` is non-zero, 0 elsewhere: a select, so a NaN in padding stays out (NaN * 0 = NaN)."""
    return torch.where(mask > 0, values, torch.zeros_like(values))


def load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor, *,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Load-balancing loss ``E * sum_i f_i * P_i``, exactly 1 at perfect balance for any ``k``.

    ``f_i`` is the fraction of the ``T * k`` (token, expert) assignments that go to expert ``i`` and ``P_i``
    the mean router probability of expert ``i`` over the ``T`` tokens. Both sum to 1 over the experts, so the
    loss is 1 when both are uniform (``1/E`` each) and grows as routing concentrates. ``f`` is a count and
    carries no gradient; the gradient flows through ``P`` :cite:p:`fedus2022switch`:
    ``d loss / d P_i = E * f_i``, so router probability is pushed away from each expert in proportion to its
    load.

    ``transformers``' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE) divides the counts by ``T``
    instead of ``T * k``, so its ``f`` sums to ``k`` and it equals ``k`` times this loss (``k`` at balance):
    ``hf_loss = k * load_balancing_loss(...)``. With ``k = 1`` the two coincide with Switch's loss.

    Args:
        router_probs: ``[T, E]`` (or ``[..., E]``) rows summing to 1, e.g. ``Routing.router_probs``.
        expert_indices: ``[T, k]`` (or ``[..., k]``) int64, the chosen experts.
        attention_mask: optional, one entry per token (e.g. ``[batch, seq]``), 1 for real tokens and 0 for
            padding, which is left out of both ``f`` and ``P``.

    Returns:
        Scalar float32 tensor.
    """
    _check_routing_pair(router_probs, expert_indices)
    E, k = router_probs.shape[-1], expert_indices.shape[-1]
    probs = router_float(router_probs.reshape(-1, E))
    indices = expert_indices.reshape(-1, k)
    mask = _token_mask(attention_mask, probs.shape[:1], probs.device, probs.dtype)
    if mask is None:
        mask = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    counts = torch.zeros(E, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add_(0, indices.reshape(-1), mask.repeat_interleave(k))
    n_tokens = mask.sum().clamp_min(1.0)  # all-padding batches give 0, not NaN
    f = counts / (n_tokens * k)
    P = _masked(probs, mask.unsqueeze(-1)).sum(dim=0) / n_tokens
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE :cite:p:`zoph2022stmoe`): mean over tokens of ``logsumexp(logits)^2``.

    It keeps the router logits small, where the float32 exponentials of the softmax are accurate; ST-MoE
    weights it by 0.001.

    Args:
        router_logits: ``[T, E]`` (or ``[..., E]``).
        attention_mask: optional, one entry per token, 1 for real tokens; padding is left out of the mean.

    Returns:
        Scalar float32 tensor.
    """
    _checks.float_tensor("router_logits", router_logits, min_dim=1)
    z = torch.logsumexp(router_float(router_logits), dim=-1).reshape(-1) ** 2
    mask = _token_mask(attention_mask, z.shape, z.device, z.dtype)
    if mask is None:
        return z.mean()
    return _masked(z, mask).sum() / mask.sum().clamp_min(1.0)


def sequence_balance_loss(router_scores: torch.Tensor, expert_indices: torch.Tensor, *,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss :cite:p:`deepseekv3`, averaged over sequences.

    For each sequence of ``S`` tokens: ``f_i = E / (k * S) * count_i`` (``count_i``: tokens of the sequence
    that chose expert ``i``), ``P_i`` = mean over the sequence of the normalised scores ``s_i / sum_j s_j``,
    loss ``= sum_i f_i * P_i``. It is 1 at perfect balance (``f_i = 1``, ``P_i = 1/E``) and, unlike the
    batch-level :func:`load_balancing_loss`, penalises imbalance within each sequence.

    Args:
        router_scores: ``[B, S, E]`` non-negative scores (sigmoid scores, or softmax probabilities); each row
            is divided by its sum, so ``Routing.router_probs`` can be passed as well.
        expert_indices: ``[B, S, k]`` int64.
        attention_mask: optional ``[B, S]``, 1 for real tokens: padding is left out of ``count``, ``P`` and
            ``S``, and a sequence without real tokens out of the mean.

    Returns:
        Scalar float32 tensor, the mean over the ``B`` sequences.
    """
    _check_routing_pair(router_scores, expert_indices, "router_scores")
    if router_scores.dim() != 3:
        raise ValueError(f"router_scores must be [batch, seq, E], got shape {tuple(router_scores.shape)}")
    B, S, E = router_scores.shape
    k = expert_indices.shape[-1]
    scores = router_float(router_scores)
    probs = scores / scores.sum(dim=-1, keepdim=True)
    mask = _token_mask(attention_mask, probs.shape[:2], probs.device, probs.dtype)
    mask = torch.ones(B, S, dtype=probs.dtype, device=probs.device) if mask is None else mask.view(B, S)
    counts = torch.zeros(B, E, dtype=scores.dtype, device=scores.device).scatter_add_(
        1, expert_indices.reshape(B, S * k), mask.repeat_interleave(k, dim=1))
    real = mask.sum(dim=1)  # [B] real tokens of each sequence
    f = counts * E / (k * real.clamp_min(1.0)).unsqueeze(1)
    P = _masked(probs, mask.unsqueeze(-1)).sum(dim=1) / real.clamp_min(1.0).unsqueeze(1)
    has_tokens = (real > 0).to(probs.dtype)
    return ((f * P).sum(dim=-1) * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def aux_losses(routing, config: AuxLossConfig, sequence_length: int, token_mask: torch.Tensor | None = None, *,
               every: bool = False, balance: bool = True) -> dict[str, torch.Tensor]:
    """The unweighted losses an MoE layer wants for ``routing`` (a :class:`~moe_ref.routing.Routing`).

    All of :data:`LOSS_NAMES` if ``every`` or ``config.compute_all``; otherwise those whose coefficient is
    above 0, and only when gradients are on. ``balance=False`` (expert choice, balanced by construction)
    leaves out the two balance losses. ``token_mask`` ``[T]`` bool marks the real tokens; the tokens form
    sequences of ``sequence_length`` for the sequence-wise loss.
    """
    every = every or config.compute_all
    names = [n for n in LOSS_NAMES if every or (config.coef(n) > 0 and torch.is_grad_enabled())]
    names = [n for n in names if balance or n == "z"]
    T = routing.num_tokens
    if T == 0:
        return {}
    losses = {}
    if "balance" in names:
        losses["balance"] = load_balancing_loss(routing.router_probs, routing.expert_indices,
                                                attention_mask=token_mask)
    if "seq_balance" in names:
        B, S = T // sequence_length, sequence_length
        losses["seq_balance"] = sequence_balance_loss(
            routing.router_probs.reshape(B, S, -1), routing.expert_indices.reshape(B, S, -1),
            attention_mask=None if token_mask is None else token_mask.view(B, S))
    if "z" in names:
        losses["z"] = router_z_loss(routing.router_logits, attention_mask=token_mask)
    return losses


def weighted_aux_loss(losses: dict[str, torch.Tensor], config: AuxLossConfig) -> torch.Tensor | None:
    """``sum(coef * loss)`` over the losses with a coefficient above 0, or ``None`` if there are none."""
    terms = [config.coef(name) * loss for name, loss in losses.items() if config.coef(name) > 0]
    return torch.stack(terms).sum() if terms else None
