"""Chapter 2: routing, the step that decides which experts see which token.

A router turns token vectors ``x`` ``[T, d_model]`` into a :class:`Routing` record: who goes where, with
which weight. The MoE layer (:mod:`moe_ref.moe`) then dispatches tokens, runs the experts and combines their
outputs; it never looks inside the router. Every router computes its logits and scores in float32 whatever
the dtype of ``x``, because top-k choices and softmax sums are sensitive to rounding.

The routing rule is split from the router module: the functions :func:`softmax_topk`,
:func:`sigmoid_grouped_topk` and :func:`expert_choice` take logits and return a record, so they can be
checked on logits written down by hand; the modules (:class:`TopKRouter`, :class:`NoisyTopKRouter`,
:class:`SigmoidRouter`, :class:`ExpertChoiceRouter`) hold the gate weights and call them.

"float32" below means float32 for float32, bfloat16 and float16 inputs, and float64 for float64 inputs
(so that ``torch.autograd.gradcheck`` can run through a router).

Routers:

* ``"softmax"``: softmax over experts, keep the top k (Shazeer et al. 2017; Lepikhin et al. 2021 GShard;
  Fedus et al. 2022 Switch; Jiang et al. 2024 Mixtral; Qwen-MoE; OLMoE), with or without renormalising the
  k kept weights.
* ``"noisy"``: noisy top-k gating (Shazeer et al. 2017), tunable Gaussian noise on the logits in training.
* ``"sigmoid"``: sigmoid scores, a selection-only bias with the auxiliary-loss-free update, and
  group-limited selection (DeepSeek-AI 2024, DeepSeek-V3).
* ``"expert_choice"``: each expert picks its top-C tokens (Zhou et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks

#: Names of the routers that :func:`make_router` and :class:`~moe_ref.moe.MoE` accept.
ROUTERS = ("softmax", "noisy", "sigmoid", "expert_choice")


@dataclass
class Routing:
    """Who goes where: the output of a router for ``T`` tokens and ``E`` experts.

    The record is token-major: row ``t`` of ``expert_indices`` lists the experts of token ``t``. Token-choice
    routers (softmax, noisy, sigmoid) give every token exactly ``k`` experts and leave ``mask`` as ``None``.
    Expert-choice routing gives a token anywhere from 0 to ``E`` experts; it uses ``k = E`` slots, slot ``j``
    standing for expert ``j``, and ``mask[t, j]`` says whether expert ``j`` took token ``t`` (its combine
    weight is 0 when it did not).

    Attributes:
        expert_indices: ``[T, k]`` int64, the expert of each (token, slot).
        combine_weights: ``[T, k]`` float32, the weight of each expert's output in the token's output.
        router_logits: ``[T, E]`` float32, the gate logits ``x W_g`` (with the noise, for the noisy router).
        router_scores: ``[T, E]`` float32, the scores the selection ranks (before any selection bias):
            softmax probabilities, or sigmoid scores for the sigmoid router.
        router_probs: ``[T, E]`` float32, rows summing to 1, for the balance losses: the softmax
            probabilities, or the sigmoid scores divided by their row sum (DeepSeek-V3). The same tensor as
            ``router_scores`` for softmax routers.
        tokens_per_expert: ``[E]`` int64, the number of (token, expert) assignments of each expert.
        mask: ``[T, k]`` bool, which slots are real assignments; ``None`` when all are.
        capacity: tokens per expert of expert-choice routing, or slots per expert and group of a
            capacity-limited token-choice routing (:func:`~moe_ref.capacity.apply_capacity`); ``None`` for
            dropless token choice.
        dropped: ``[T, k]`` bool, the pairs the router chose but a capacity limit dropped (their combine
            weight is 0 and ``mask`` is false); ``None`` when no capacity limit was applied.
        positions: ``[T, k]`` int64, the slot of each kept pair in its expert's buffer for its group, ``-1``
            for a dropped pair (:func:`~moe_ref.capacity.queue_positions`); ``None`` without a capacity limit.
        group_size: tokens per capacity group (the sequence length, or ``T``); ``None`` without a capacity
            limit.
    """

    expert_indices: torch.Tensor
    combine_weights: torch.Tensor
    router_logits: torch.Tensor
    router_scores: torch.Tensor
    router_probs: torch.Tensor
    tokens_per_expert: torch.Tensor
    mask: torch.Tensor | None = None
    capacity: int | None = None
    dropped: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def num_tokens(self) -> int:
        """``T``, the number of routed tokens."""
        return self.router_logits.shape[0]

    @property
    def num_experts(self) -> int:
        """``E``, the number of experts."""
        return self.router_logits.shape[1]

    @property
    def k(self) -> int:
        """The number of slots per token (experts per token for token choice, ``E`` for expert choice)."""
        return self.expert_indices.shape[1]

    @property
    def num_dropped(self) -> int:
        """Number of (token, expert) pairs dropped by a capacity limit (0 without one)."""
        return 0 if self.dropped is None else int(self.dropped.sum())

    @property
    def drop_rate(self) -> float:
        """Fraction of the ``T * k`` chosen pairs dropped by a capacity limit (0.0 without one or without tokens)."""
        pairs = self.expert_indices.numel()
        return self.num_dropped / pairs if self.dropped is not None and pairs else 0.0

    @property
    def kept_per_expert(self) -> torch.Tensor:
        """``[E]`` int64, the pairs each expert actually processes (``tokens_per_expert`` minus drops)."""
        if self.mask is None:
            return self.tokens_per_expert
        return _count(self.expert_indices, self.num_experts, self.mask)

    def assignments(self):
        """The real (token, expert, weight) assignments, flattened token-major.

        Returns:
            ``(token_ids, expert_ids, weights)``: ``[A]`` int64, ``[A]`` int64, ``[A]`` float32, where
            ``A = T * k`` for token choice and ``E * capacity`` for expert choice.
        """
        token_ids = torch.arange(self.num_tokens, device=self.expert_indices.device)
        token_ids = token_ids.repeat_interleave(self.k)
        expert_ids, weights = self.expert_indices.reshape(-1), self.combine_weights.reshape(-1)
        if self.mask is not None:
            keep = self.mask.reshape(-1)
            token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
        return token_ids, expert_ids, weights


def router_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the router's precision: float64 stays float64, every other dtype goes to float32."""
    return t if t.dtype == torch.float64 else t.float()


def _count(expert_indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
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


def softmax_topk(logits: torch.Tensor, k: int, *, norm_topk_prob: bool) -> Routing:
    """Softmax over the experts, keep the ``k`` most probable.

    The weight of a kept expert is its probability ``p_i`` (Switch, Fedus et al. 2022, with ``k=1``; Qwen-MoE
    and OLMoE with ``norm_topk_prob=False``), or ``p_i / sum of the k kept p`` with ``norm_topk_prob``
    (GShard, Lepikhin et al. 2021; Mixtral, Jiang et al. 2024). Renormalising with ``k=1`` would make every
    weight 1 and give the router no gradient from the LM loss.

    Args:
        logits: ``[T, E]`` floating point; computed on in float32.
        k: experts per token, ``1 <= k <= E``.
        norm_topk_prob: renormalise the kept weights to sum to 1.

    Returns:
        The :class:`Routing`; ``expert_indices`` in decreasing order of probability.
    """
    logits = _check_logits(logits, k)
    probs = logits.softmax(dim=-1)
    weights, expert_indices = probs.topk(k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(expert_indices, weights, logits, probs, probs,
                   tokens_per_expert=_count(expert_indices, logits.shape[1]))


def noisy_logits(clean_logits: torch.Tensor, noise_logits: torch.Tensor) -> torch.Tensor:
    """Noisy top-k gating's logits (Shazeer et al. 2017): ``H = x W_g + StandardNormal() * Softplus(x W_noise)``.

    Args:
        clean_logits: ``[T, E]``, ``x W_g``.
        noise_logits: ``[T, E]``, ``x W_noise``: the learned, per-token, per-expert noise scale before softplus.

    Returns:
        ``[T, E]`` float32 ``H``, drawn from the global torch RNG. Keeping the top k of ``H`` and taking a softmax
        over the kept ones equals :func:`softmax_topk` on ``H`` with ``norm_topk_prob=True``.
    """
    clean, scale = router_float(clean_logits), F.softplus(router_float(noise_logits))
    return clean + torch.randn_like(clean) * scale


def sigmoid_grouped_topk(logits: torch.Tensor, k: int, *, expert_bias: torch.Tensor | None = None,
                         n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
                         norm_topk_prob: bool = True) -> Routing:
    """DeepSeek-V3 routing (DeepSeek-AI 2024): sigmoid scores, biased group-limited selection, unbiased weights.

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
        expert_bias: ``[E]`` selection-only bias, or ``None`` for zeros.
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
    _check_groups(E, k, n_group, topk_group)
    scores = logits.sigmoid()
    selection = scores.detach() if expert_bias is None else scores.detach() + expert_bias.to(scores.dtype)
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
    return Routing(expert_indices, weights, logits, scores, probs, tokens_per_expert=_count(expert_indices, E))


def _check_groups(num_experts: int, k: int, n_group: int, topk_group: int) -> None:
    _checks.positive_int("n_group", n_group)
    _checks.positive_int("topk_group", topk_group)
    if num_experts % n_group:
        raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group must be <= n_group={n_group}, got topk_group={topk_group}")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"k={k} exceeds the {topk_group * (num_experts // n_group)} experts in topk_group="
                         f"{topk_group} groups of {num_experts // n_group}")


def expert_choice_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float = 1.0) -> int:
    """Tokens per expert of expert-choice routing: ``C = ceil(capacity_factor * T * k / E)``, at most ``T``.

    With ``capacity_factor = 1`` the experts process ``E * C ~ T * k`` (token, expert) pairs in all, the
    same compute as top-k token choice (Zhou et al. 2022 write ``k = n * c / e``).
    """
    _checks.positive_int("num_tokens", num_tokens)
    _checks.positive_int("num_experts", num_experts)
    _checks.positive_int("k", k)
    _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
    # round() first so that a product such as 1.1 * 10 = 11.000000000000002 does not ceil to 12
    return max(1, min(num_tokens, math.ceil(round(capacity_factor * num_tokens * k / num_experts, 9))))


def expert_choice(logits: torch.Tensor, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): every expert takes its ``capacity`` highest-scoring tokens.

    Scores are the softmax over experts, ``P = softmax(logits)`` ``[T, E]``; expert ``j`` takes the ``C``
    tokens with the largest ``P[:, j]`` and weights each by that score. Load is perfectly balanced by
    construction, but a token may get no expert (its MoE output is 0; the residual stream carries it) or
    several. The choice looks at all ``T`` tokens at once, future positions included, so in a causal language
    model it leaks information across positions during training and cannot be applied token by token at
    inference.

    Args:
        logits: ``[T, E]``.
        capacity: ``C``, tokens per expert, ``1 <= C <= T`` (see :func:`expert_choice_capacity`).

    Returns:
        The :class:`Routing` in token-major form with ``k = E`` slots (slot ``j`` is expert ``j``): ``mask[t, j]``
        says whether expert ``j`` took token ``t``, and ``combine_weights[t, j]`` is ``P[t, j]`` then and 0
        otherwise.
    """
    logits = _check_logits(logits)
    T, E = logits.shape
    _checks.positive_int("capacity", capacity)
    if capacity > T:
        raise ValueError(f"capacity must be <= the number of tokens T={T}, got {capacity}")
    probs = logits.softmax(dim=-1)
    chosen_tokens = probs.t().topk(capacity, dim=-1).indices  # [E, C] token ids, expert-major
    mask = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    mask[chosen_tokens, torch.arange(E, device=logits.device).unsqueeze(1)] = True
    weights = torch.where(mask, probs, torch.zeros_like(probs))
    expert_indices = torch.arange(E, device=logits.device).expand(T, E)
    tokens_per_expert = torch.full((E,), capacity, dtype=torch.int64, device=logits.device)
    return Routing(expert_indices, weights, logits, probs, probs, tokens_per_expert, mask=mask, capacity=capacity)


class Router(nn.Module):
    """Base of the routers: a bias-free linear gate ``x -> x W_g`` ``[T, E]`` computed in float32.

    Args:
        d_model: width of the token vectors.
        num_experts: ``E``.
        k: experts per token (average experts per token for expert choice).
    """

    def __init__(self, d_model: int, num_experts: int, k: int):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.k = _checks.positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, d_model]`` -> ``[T, E]`` float32 ``x W_g``."""
        x = router_float(x)
        return F.linear(x, self.gate.weight.to(x.dtype))

    def forward(self, x: torch.Tensor) -> Routing:
        """``x``: ``[T, d_model]`` floating point. Returns the :class:`Routing` of the ``T`` tokens."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Hook called by the training loop after each optimizer step; nothing to do by default."""

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token: ``2 * d_model * E``."""
        return 2 * self.d_model * self.num_experts

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"


class TopKRouter(Router):
    """Softmax then top-k (see :func:`softmax_topk`).

    Args:
        d_model: width of the token vectors.
        num_experts: ``E``.
        k: experts per token.
        norm_topk_prob: renormalise the ``k`` kept weights; ``None`` (default) means ``k > 1``: Switch's raw
            probability for ``k = 1``, GShard and Mixtral's renormalised weights for ``k >= 2``.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, norm_topk_prob: bool | None = None):
        super().__init__(d_model, num_experts, k)
        self.norm_topk_prob = _bool("norm_topk_prob", k > 1 if norm_topk_prob is None else norm_topk_prob)

    def forward(self, x: torch.Tensor) -> Routing:
        """``x``: ``[T, d_model]``. Returns the :class:`Routing`."""
        return softmax_topk(self.logits(x), self.k, norm_topk_prob=self.norm_topk_prob)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017): top k of ``x W_g + N(0, 1) * softplus(x W_noise)``.

    The noise is drawn only in training mode; in eval mode the router is plain softmax top-k. The weights are
    a softmax over the ``k`` kept logits. The paper's smooth "load" loss is not reproduced; use the
    balance loss of :mod:`moe_ref.losses`.

    Args:
        d_model: width of the token vectors.
        num_experts: ``E``.
        k: experts per token.

    Attributes:
        w_noise: ``nn.Linear(d_model, E)`` without bias, zero-initialised (so training starts with noise of
            scale ``softplus(0) = log 2``).
    """

    def __init__(self, d_model: int, num_experts: int, k: int):
        super().__init__(d_model, num_experts, k)
        self.w_noise = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.w_noise.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        """``x``: ``[T, d_model]``. Returns the :class:`Routing`; ``router_logits`` hold the noisy logits."""
        logits = self.logits(x)
        if self.training:
            x = router_float(x)
            logits = noisy_logits(logits, F.linear(x, self.w_noise.weight.to(x.dtype)))
        return softmax_topk(logits, self.k, norm_topk_prob=True)

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token: ``4 * d_model * E`` (the gate and the noise projection)."""
        return 2 * super().flops_per_token()


class SigmoidRouter(Router):
    """DeepSeek-V3's router (see :func:`sigmoid_grouped_topk`) with the auxiliary-loss-free bias update.

    Auxiliary-loss-free balancing (DeepSeek-AI 2024): the router counts the assignments of each expert over
    the training-mode forwards since the last update; :meth:`update_bias` (called by
    :meth:`after_optimizer_step`) moves every bias a fixed step towards balance,
    ``b_i += bias_update_rate * sign(mean_load - load_i)``, and resets the counts. An overloaded expert
    becomes less likely to be selected; the weights, and so the LM loss, never see the bias.

    Args:
        d_model: width of the token vectors.
        num_experts: ``E``.
        k: experts per token.
        n_group: expert groups; must divide ``E``.
        topk_group: groups kept per token.
        routed_scaling_factor: multiplies the routing weights.
        norm_topk_prob: renormalise the ``k`` weights before scaling.
        bias_update_rate: the step ``gamma`` of the bias update (0.001 in DeepSeek-V3); 0 turns it off.

    Attributes:
        expert_bias: ``[E]`` float32 buffer, the selection bias (``e_score_correction_bias`` in
            ``transformers``).
        load_since_update: ``[E]`` int64 buffer (not saved), assignments counted since the last update.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True, bias_update_rate: float = 1e-3):
        super().__init__(d_model, num_experts, k)
        _check_groups(num_experts, k, n_group, topk_group)
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = _checks.finite_float("routed_scaling_factor", routed_scaling_factor,
                                                          minimum=0.0, strict=True)
        self.norm_topk_prob = _bool("norm_topk_prob", norm_topk_prob)
        self.bias_update_rate = _checks.finite_float("bias_update_rate", bias_update_rate, minimum=0.0)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load_since_update", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """``x``: ``[T, d_model]``. Returns the :class:`Routing`; in training mode also counts the load."""
        routing = sigmoid_grouped_topk(self.logits(x), self.k, expert_bias=self.expert_bias, n_group=self.n_group,
                                       topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                                       norm_topk_prob=self.norm_topk_prob)
        if self.training:
            self.load_since_update += routing.tokens_per_expert
        return routing

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` would round the bias; its steps of ~0.001 need float32.
        super()._apply(fn, recurse)
        self.expert_bias = self.expert_bias.float()
        return self

    @torch.no_grad()
    def update_bias(self) -> None:
        """``expert_bias += bias_update_rate * sign(mean load - load)``, then reset the counts (no-op if none)."""
        load = self.load_since_update.float()
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()

    def after_optimizer_step(self) -> None:
        """The auxiliary-loss-free bias update (:meth:`update_bias`)."""
        self.update_bias()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_group={self.n_group}, topk_group={self.topk_group}, "
                f"routed_scaling_factor={self.routed_scaling_factor}, norm_topk_prob={self.norm_topk_prob}, "
                f"bias_update_rate={self.bias_update_rate}")


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022; see :func:`expert_choice`).

    Each expert takes ``C = ceil(capacity_factor * T * k / E)`` tokens (at most ``T``) of the ``T`` tokens of
    the forward call, so a token gets ``k * capacity_factor`` experts on average.

    Args:
        d_model: width of the token vectors.
        num_experts: ``E``.
        k: average experts per token.
        capacity_factor: multiplies the capacity.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, capacity_factor: float = 1.0):
        super().__init__(d_model, num_experts, k)
        self.capacity_factor = _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)

    def forward(self, x: torch.Tensor) -> Routing:
        """``x``: ``[T, d_model]``. Returns the :class:`Routing` (token-major with a mask)."""
        capacity = expert_choice_capacity(x.shape[0], self.num_experts, self.k, self.capacity_factor)
        return expert_choice(self.logits(x), capacity)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"


def make_router(name: str, d_model: int, num_experts: int, k: int, **options) -> Router:
    """Build a router by name: ``"softmax"``, ``"noisy"``, ``"sigmoid"`` or ``"expert_choice"``.

    ``options`` are passed to the router's constructor (e.g. ``norm_topk_prob`` for ``"softmax"``).
    """
    _checks.choice("router", name, ROUTERS)
    cls = {"softmax": TopKRouter, "noisy": NoisyTopKRouter, "sigmoid": SigmoidRouter,
           "expert_choice": ExpertChoiceRouter}[name]
    return cls(d_model, num_experts, k, **options)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
