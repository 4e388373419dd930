"""Chapter 2: routing rules, pure functions from router logits to a :class:`Routing` record.

A router (:mod:`moe_ref.routers`) computes logits ``x W_g`` ``[T, E]``; a routing rule turns them into
who-goes-where. The rules are plain functions so that they can be checked on logits written down by hand:

* :func:`softmax_topk`: softmax over experts, keep the top ``k`` :cite:p:`shazeer2017outrageously` (also
  GShard, Switch, Mixtral, Qwen-MoE, OLMoE), with or without renormalising the ``k`` kept weights.
* :func:`noisy_logits`: noisy top-k gating's logits :cite:p:`shazeer2017outrageously`.
* :func:`sigmoid_grouped_topk`: sigmoid scores, a selection-only bias and group-limited selection
  (DeepSeek-V3 :cite:p:`deepseekv3`).
* :func:`expert_choice`: each expert picks its top-``C`` tokens :cite:p:`zhou2022expertchoice`.

Every rule computes in float32 whatever the dtype of the logits ("float32" below means float32 for
float32, bfloat16 and float16 logits, and float64 for float64 logits, so that ``gradcheck`` can run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from . import _checks


@dataclass
class Routing:
    """Who goes where: the output of a router for ``T`` tokens and ``E`` experts, nothing else.

    The record is token-major: row ``t`` of ``expert_indices`` lists the experts of token ``t``, one per
    *slot*. Token-choice rules give every token ``k`` slots; expert choice gives every token ``E`` slots,
    slot ``j`` standing for expert ``j``. ``mask`` says which slots are real assignments: all of them for
    token choice without padding (``mask`` is ``None``), the experts that took the token for expert choice,
    none for a padding token.

    Attributes:
        expert_indices: ``[T, slots]`` int64, the expert of each (token, slot).
        combine_weights: ``[T, slots]`` float32, the weight of each expert's output in the token's output
            (0 where ``mask`` is false).
        router_logits: ``[T, E]`` float32, the gate logits ``x W_g`` (with the noise, for the noisy router).
        router_scores: ``[T, E]`` float32, the scores the selection ranks (before any selection bias):
            softmax probabilities, or sigmoid scores.
        router_probs: ``[T, E]`` float32, rows summing to 1, for the balance losses: the softmax
            probabilities, or the sigmoid scores divided by their row sum (DeepSeek-V3).
        tokens_per_expert: ``[E]`` int64, the number of real assignments of each expert.
        mask: ``[T, slots]`` bool, the real assignments; ``None`` when every slot is one.
    """

    expert_indices: torch.Tensor
    combine_weights: torch.Tensor
    router_logits: torch.Tensor
    router_scores: torch.Tensor
    router_probs: torch.Tensor
    tokens_per_expert: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """``T``, the number of routed tokens."""
        return self.router_logits.shape[0]

    @property
    def num_experts(self) -> int:
        """``E``, the number of experts."""
        return self.router_logits.shape[1]

    @property
    def slots(self) -> int:
        """The number of slots per token (``k`` for token choice, ``E`` for expert choice)."""
        return self.expert_indices.shape[1]

    def assignments(self, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The real (token, slot) assignments, flattened token-major.

        Args:
            mask: ``[T, slots]`` bool, the pairs to keep instead of ``self.mask`` (e.g. those a capacity
                kept); ``None`` uses ``self.mask``.

        Returns:
            ``(pair_ids, token_ids, expert_ids, weights)``, each ``[A]``: the flat index ``t * slots + j``
            of the pair, its token, its expert (int64) and its combine weight (float32).
        """
        pair_ids = torch.arange(self.expert_indices.numel(), device=self.expert_indices.device)
        expert_ids, weights = self.expert_indices.reshape(-1), self.combine_weights.reshape(-1)
        mask = self.mask if mask is None else mask
        if mask is not None:
            keep = mask.reshape(-1)
            pair_ids, expert_ids, weights = pair_ids[keep], expert_ids[keep], weights[keep]
        return pair_ids, pair_ids // max(self.slots, 1), expert_ids, weights

    def with_token_mask(self, token_mask: torch.Tensor | None) -> "Routing":
        """This routing with the slots of padding tokens (``token_mask[t]`` false) removed.

        ``token_mask``: ``[T]`` bool, ``True`` for real tokens; ``None`` returns ``self``.
        """
        if token_mask is None:
            return self
        if token_mask.shape != (self.num_tokens,) or token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a [T] = [{self.num_tokens}] bool tensor, got "
                             f"{token_mask.dtype} {tuple(token_mask.shape)}")
        mask = token_mask.unsqueeze(1).expand_as(self.expert_indices)
        mask = mask if self.mask is None else mask & self.mask
        return replace(self, mask=mask, combine_weights=self.combine_weights.masked_fill(~mask, 0.0),
                       tokens_per_expert=count_per_expert(self.expert_indices, self.num_experts, mask))

    def detach(self) -> "Routing":
        """A copy whose tensors are detached from the autograd graph (for keeping after a forward)."""
        return Routing(**{f.name: _detach(getattr(self, f.name)) for f in fields(self)})


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def router_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the router's precision: float64 stays float64, every other dtype goes to float32."""
    return t if t.dtype == torch.float64 else t.float()


def count_per_expert(expert_indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``[E]`` int64 number of assignments of each expert (only where ``mask`` is true, if given)."""
    chosen = expert_indices.reshape(-1) if mask is None else expert_indices[mask]
    return torch.bincount(chosen, minlength=num_experts)


def _check_logits(logits, k: int | None = None) -> torch.Tensor:
    _checks.float_tensor("logits", logits, min_dim=2)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if k is not None:
        _checks.positive_int("k", k)
        if k > logits.shape[1]:
            raise ValueError(f"k must be <= the number of experts E={logits.shape[1]}, got k={k}")
    return router_float(logits)


def _check_bias(expert_bias, num_experts: int) -> torch.Tensor:
    """``expert_bias`` as a float32 (float64) ``[E]`` tensor, or a ValueError naming it."""
    if not isinstance(expert_bias, torch.Tensor) or expert_bias.shape != (num_experts,):
        shape = tuple(getattr(expert_bias, "shape", ()))
        raise ValueError(f"expert_bias must be a [E] = [{num_experts}] tensor, got {shape}")
    return router_float(expert_bias)


def softmax_topk(logits: torch.Tensor, k: int, *, norm_topk_prob: bool,
                 expert_bias: torch.Tensor | None = None) -> Routing:
    """Softmax over the experts, keep the ``k`` most probable.

    The weight of a kept expert is its probability ``p_i`` (Switch with ``k=1``; Qwen-MoE and OLMoE with
    ``norm_topk_prob=False``), or ``p_i / sum of the k kept p`` with ``norm_topk_prob`` (GShard; Mixtral).
    Renormalising with ``k=1`` would make every weight 1 and give the router no gradient from the LM loss.

    With ``expert_bias`` ``b``, the ``k`` experts are those with the largest ``p_i + b_i`` (the
    auxiliary-loss-free bias of :func:`sigmoid_grouped_topk`, on softmax scores), and their weights are still
    the unbiased ``p_i``: the bias steers *which* experts are chosen, never the output.

    Args:
        logits: ``[T, E]`` floating point; computed on in float32.
        k: experts per token, ``1 <= k <= E``.
        norm_topk_prob: renormalise the kept weights to sum to 1.
        expert_bias: ``[E]`` selection-only bias, or ``None`` (plain top-k).

    Returns:
        The :class:`Routing`; ``expert_indices`` in decreasing order of (biased) selection score.
    """
    logits = _check_logits(logits, k)
    probs = logits.softmax(dim=-1)
    if expert_bias is None:
        weights, expert_indices = probs.topk(k, dim=-1)
    else:
        selection = probs.detach() + _check_bias(expert_bias, logits.shape[1]).to(probs.dtype)
        expert_indices = selection.topk(k, dim=-1).indices
        weights = probs.gather(1, expert_indices)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(expert_indices, weights, logits, probs, probs,
                   tokens_per_expert=count_per_expert(expert_indices, logits.shape[1]))


def noisy_logits(clean_logits: torch.Tensor, noise_logits: torch.Tensor) -> torch.Tensor:
    """Noisy top-k gating's logits: ``H = x W_g + StandardNormal() * Softplus(x W_noise)``.

    Introduced with noisy top-k gating by :cite:t:`shazeer2017outrageously`.

    Args:
        clean_logits: ``[T, E]``, ``x W_g``.
        noise_logits: ``[T, E]``, ``x W_noise``: the learned, per-token, per-expert noise scale before softplus.

    Returns:
        ``[T, E]`` float32 ``H``, drawn from the global torch RNG. Keeping the top k of ``H`` and taking a softmax
        over the kept ones equals :func:`softmax_topk` on ``H`` with ``norm_topk_prob=True``.
    """
    clean, scale = router_float(clean_logits), F.softplus(router_float(noise_logits))
    return clean + torch.randn_like(clean) * scale


def check_groups(num_experts: int, k: int, n_group: int, topk_group: int) -> None:
    """Check the group-limited selection arguments of :func:`sigmoid_grouped_topk`."""
    _checks.positive_int("n_group", n_group)
    _checks.positive_int("topk_group", topk_group)
    if num_experts % n_group:
        raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group must be <= n_group={n_group}, got topk_group={topk_group}")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"k={k} exceeds the {topk_group * (num_experts // n_group)} experts in topk_group="
                         f"{topk_group} groups of {num_experts // n_group}")


def sigmoid_grouped_topk(logits: torch.Tensor, k: int, *, expert_bias: torch.Tensor | None = None,
                         n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
                         norm_topk_prob: bool = True) -> Routing:
    """DeepSeek-V3 routing: sigmoid scores, biased group-limited selection, unbiased weights.

    As described in the DeepSeek-V3 report :cite:p:`deepseekv3`.

    1. Scores ``s = sigmoid(logits)``; selection scores ``s + b`` with the per-expert bias ``b``
       (``expert_bias``), which steers *which* experts are chosen but not their weights.
    2. Group-limited selection: the ``E`` experts form ``n_group`` equal groups; a group's score is the sum
       of its 2 largest selection scores; only the experts of the best ``topk_group`` groups are eligible
       (this bounds how many devices a token is sent to when groups are devices).
    3. The top ``k`` eligible experts by selection score.
    4. Weights: their unbiased scores ``s``, divided by their sum if ``norm_topk_prob``, times
       ``routed_scaling_factor``.

    Args:
        logits: ``[T, E]``.
        k: experts per token.
        expert_bias: ``[E]`` selection-only bias, or ``None`` for zeros. Added in float32 (float64 for
            float64 logits), never rounded to the logits' dtype.
        n_group: number of expert groups; must divide ``E``.
        topk_group: groups kept per token, ``1 <= topk_group <= n_group``, with at least ``k`` experts in them.
        routed_scaling_factor: multiplies the weights (2.5 in DeepSeek-V3).
        norm_topk_prob: renormalise the ``k`` weights to sum to 1 before scaling.

    Returns:
        The :class:`Routing`; ``router_scores`` are the sigmoid scores ``s`` and ``router_probs`` are
        ``s`` divided by its row sum (as in DeepSeek-V3's sequence-wise balance loss).
    """
    logits = _check_logits(logits, k)
    T, E = logits.shape
    check_groups(E, k, n_group, topk_group)
    scores = logits.sigmoid()
    selection = scores.detach()
    if expert_bias is not None:
        selection = selection + _check_bias(expert_bias, E).to(scores.dtype)
    if n_group > 1:
        per_group = E // n_group
        grouped = selection.view(T, n_group, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, n_group]
        kept_groups = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        eligible = group_mask.repeat_interleave(per_group, dim=1)  # [T, E]
        selection = selection.masked_fill(~eligible, float("-inf"))
    expert_indices = selection.topk(k, dim=-1).indices
    weights = scores.gather(1, expert_indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    probs = scores / scores.sum(dim=-1, keepdim=True)
    return Routing(expert_indices, weights, logits, scores, probs,
                   tokens_per_expert=count_per_expert(expert_indices, E))


def expert_choice_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float = 1.0) -> int:
    """Tokens per expert of expert-choice routing: ``C = ceil(capacity_factor * T * k / E)``, in ``[1, T]``.

    With ``capacity_factor = 1`` the experts process ``E * C ~ T * k`` (token, expert) pairs in all, the
    same compute as top-k token choice (:cite:t:`zhou2022expertchoice` write ``k = n * c / e``). 0 for
    ``T = 0``.
    """
    _checks.positive_int("num_tokens", num_tokens, minimum=0)
    _checks.positive_int("num_experts", num_experts)
    _checks.positive_int("k", k)
    _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
    if num_tokens == 0:
        return 0
    # round() first so that a product such as 1.1 * 10 = 11.000000000000002 does not ceil to 12
    return max(1, min(num_tokens, math.ceil(round(capacity_factor * num_tokens * k / num_experts, 9))))


def expert_choice(logits: torch.Tensor, capacity: int, *, token_mask: torch.Tensor | None = None) -> Routing:
    """Expert-choice routing: every expert takes its ``capacity`` highest-scoring tokens.

    Introduced by :cite:t:`zhou2022expertchoice`.

    Scores are the softmax over experts, ``P = softmax(logits)`` ``[T, E]``; expert ``j`` takes the ``C``
    tokens with the largest ``P[:, j]`` and weights each by that score. Load is perfectly balanced by
    construction, but a token may get no expert (its MoE output is 0; the residual stream carries it) or
    several. The choice looks at all ``T`` tokens at once, future positions included, so in a causal language
    model it leaks information across positions during training and cannot be applied token by token at
    inference.

    Args:
        logits: ``[T, E]``.
        capacity: ``C``, tokens per expert, ``0 <= C <=`` the number of real tokens
            (see :func:`expert_choice_capacity`).
        token_mask: ``[T]`` bool, ``True`` for the tokens an expert may take (padding is never taken).

    Returns:
        The :class:`Routing` in token-major form with ``E`` slots (slot ``j`` is expert ``j``): ``mask[t, j]``
        says whether expert ``j`` took token ``t``, and ``combine_weights[t, j]`` is ``P[t, j]`` then and 0
        otherwise.
    """
    logits = _check_logits(logits)
    T, E = logits.shape
    _checks.positive_int("capacity", capacity, minimum=0)
    available = T if token_mask is None else int(token_mask.sum())
    if capacity > available:
        raise ValueError(f"capacity must be <= the number of real tokens {available}, got {capacity}")
    probs = logits.softmax(dim=-1)
    eligible = probs if token_mask is None else probs.detach().masked_fill(~token_mask.unsqueeze(1), -1.0)
    chosen_tokens = eligible.t().topk(capacity, dim=-1).indices  # [E, C] token ids, expert-major
    mask = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    mask[chosen_tokens, torch.arange(E, device=logits.device).unsqueeze(1)] = True
    weights = torch.where(mask, probs, torch.zeros_like(probs))
    expert_indices = torch.arange(E, device=logits.device).expand(T, E)
    tokens_per_expert = torch.full((E,), capacity, dtype=torch.int64, device=logits.device)
    return Routing(expert_indices, weights, logits, probs, probs, tokens_per_expert, mask=mask)
