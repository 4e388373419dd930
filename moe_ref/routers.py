"""Chapter 2: router modules, which hold the gate weights and apply a routing rule of :mod:`moe_ref.routing`.

A router maps token vectors ``x`` ``[T, d_model]`` to a :class:`~moe_ref.routing.Routing`. Its options are
one :class:`RouterConfig`, which :class:`~moe_ref.moe.MoE` takes as its ``router`` argument:

.. list-table::
   :header-rows: 1

   * - ``kind``
     - rule
     - options
   * - ``"softmax"``
     - :func:`~moe_ref.routing.softmax_topk`, optionally with the auxiliary-loss-free bias
     - ``norm_topk_prob``, ``bias_update_rate``
   * - ``"noisy"``
     - noisy logits, then softmax top-k renormalised
     -
   * - ``"sigmoid"``
     - :func:`~moe_ref.routing.sigmoid_grouped_topk` with the auxiliary-loss-free bias
     - ``norm_topk_prob``, ``n_group``, ``topk_group``, ``routed_scaling_factor``, ``bias_update_rate``
   * - ``"expert_choice"``
     - :func:`~moe_ref.routing.expert_choice`
     - ``capacity_factor``

Every kind takes ``jitter_noise`` (Switch's and Mixtral's input jitter, training only).

**Precision.** A router computes in float32 (float64 in a float64 module), outside autocast, and its
parameters and buffers *stay* float32 when the module is cast to bfloat16 or float16 (``.to(torch.bfloat16)``,
``.half()``): top-k choices, softmax sums and the DeepSeek-V3 bias's steps of 0.001 need the precision.
This is what ``transformers`` does for DeepSeek-V3's gate and ``e_score_correction_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .routing import (Routing, check_groups, expert_choice, expert_choice_capacity, noisy_logits, router_float,
                      softmax_topk, sigmoid_grouped_topk)

#: The router kinds.
ROUTERS = ("softmax", "noisy", "sigmoid", "expert_choice")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RouterConfig:
    """Which router, and its options. Options that do not apply to ``kind`` must stay at their defaults.

    Attributes:
        kind: ``"softmax"`` (default), ``"noisy"``, ``"sigmoid"`` or ``"expert_choice"``.
        norm_topk_prob: softmax and sigmoid: renormalise the ``k`` weights (default: ``k > 1`` for softmax,
            ``True`` for sigmoid). ``transformers``: ``norm_topk_prob``.
        n_group: sigmoid: expert groups for group-limited selection (``n_group``).
        topk_group: sigmoid: groups a token may use (``topk_group``).
        routed_scaling_factor: sigmoid: scale of the weights (``routed_scaling_factor``).
        bias_update_rate: softmax and sigmoid: the step of the auxiliary-loss-free bias update
            (DeepSeek-V3 uses 0.001; torchtitan's ``load_balance_coeff``); 0 turns it off. ``None``
            (default): 0.001 for sigmoid, and no bias for softmax.
        capacity_factor: expert choice: each expert takes ``ceil(capacity_factor * T * k / E)`` tokens.
        jitter_noise: training only, multiply the router's input by ``U(1 - eps, 1 + eps)`` noise
            (``router_jitter_noise``); 0 is off.
        jitter_experts: the experts see the jittered input too (Mixtral) instead of the clean one (Switch).
    """

    kind: str = "softmax"
    norm_topk_prob: bool | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    bias_update_rate: float | None = None
    capacity_factor: float = 1.0
    jitter_noise: float = 0.0
    jitter_experts: bool = False

    #: The options of each kind (the jitter options apply to all).
    _KIND_OPTIONS = {"norm_topk_prob": ("softmax", "sigmoid"), "n_group": ("sigmoid",),
                     "topk_group": ("sigmoid",), "routed_scaling_factor": ("sigmoid",),
                     "bias_update_rate": ("softmax", "sigmoid"), "capacity_factor": ("expert_choice",)}

    def __post_init__(self):
        _checks.choice("kind", self.kind, ROUTERS)
        for f in fields(self):
            kinds = self._KIND_OPTIONS.get(f.name)
            if kinds and self.kind not in kinds and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name} applies only to router kinds {kinds}, got kind={self.kind!r}")
        if self.norm_topk_prob is not None:
            _checks.boolean("norm_topk_prob", self.norm_topk_prob)
        _checks.positive_int("n_group", self.n_group)
        _checks.positive_int("topk_group", self.topk_group)
        _checks.finite_float("routed_scaling_factor", self.routed_scaling_factor, minimum=0.0, strict=True)
        if self.bias_update_rate is not None:
            _checks.finite_float("bias_update_rate", self.bias_update_rate, minimum=0.0)
        _checks.finite_float("capacity_factor", self.capacity_factor, minimum=0.0, strict=True)
        _checks.finite_float("jitter_noise", self.jitter_noise, minimum=0.0)
        if self.jitter_noise >= 1:
            raise ValueError(f"jitter_noise must be < 1, got {self.jitter_noise}")
        _checks.boolean("jitter_experts", self.jitter_experts)

    @classmethod
    def coerce(cls, router) -> "RouterConfig":
        """A :class:`RouterConfig` from itself or from a kind name (``"softmax"``...)."""
        if isinstance(router, cls):
            return router
        if isinstance(router, str):
            return cls(kind=router)
        raise TypeError(f"router must be a RouterConfig or one of {ROUTERS}, got {type(router).__name__}")


def _keep_float32(fn):
    """Wrap a ``Module._apply`` function so that it moves tensors but never lowers them to 16-bit floats."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if out.dtype in _LOW_PRECISION and t.dtype not in _LOW_PRECISION:
            return t.to(device=out.device)  # the device move alone, from the unrounded tensor
        return out
    return apply


class Router(nn.Module):
    """Base of the routers: a bias-free linear gate ``x -> x W_g`` ``[T, E]`` computed in float32.

    **The auxiliary-loss-free bias** :cite:p:`wang2024auxfree` (sigmoid router always; softmax router with
    ``bias_update_rate > 0``): a selection-only bias ``b`` ``[E]`` (buffer ``expert_bias``, float32;
    ``e_score_correction_bias`` in ``transformers``). :meth:`record_load` adds up the assignments of each
    expert over the training steps since the last update (the MoE layer calls it once per training forward,
    not again when activation checkpointing recomputes the forward; buffer ``load_since_update``, int64, in
    the state dict so that a checkpoint taken between updates resumes exactly); :meth:`update_bias` moves
    every bias a fixed step towards balance, ``b_i += bias_update_rate * sign(mean_load - load_i)``, and
    resets the counts. An overloaded expert becomes less likely to be selected; the weights, and so the LM
    loss, never see the bias. Without a bias both methods are no-ops.

    Args:
        d_model: width of the token vectors.
        num_experts: ``E``.
        k: experts per token (average experts per token for expert choice).
        jitter_noise: see :class:`RouterConfig`.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, jitter_noise: float = 0.0):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.k = _checks.positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        self.jitter_noise = _checks.finite_float("jitter_noise", jitter_noise, minimum=0.0)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def _apply(self, fn, recurse=True):
        return super()._apply(_keep_float32(fn), recurse)

    def reset_parameters(self) -> None:
        """Re-initialise the gate as ``nn.Linear`` does (and zero the bias and its counts, if any)."""
        self.gate.reset_parameters()
        if self.has_bias:
            self.expert_bias.zero_()
            self.load_since_update.zero_()

    def _add_bias(self, bias_update_rate: float) -> None:
        """Give this router the auxiliary-loss-free bias (see :class:`Router`)."""
        self.bias_update_rate = _checks.finite_float("bias_update_rate", bias_update_rate, minimum=0.0)
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.register_buffer("load_since_update", torch.zeros(self.num_experts, dtype=torch.int64))

    @property
    def has_bias(self) -> bool:
        """Whether this router selects with the auxiliary-loss-free bias."""
        return "expert_bias" in self._buffers

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times ``U(1 - jitter_noise, 1 + jitter_noise)`` noise in training mode; ``x`` otherwise."""
        if not self.training or self.jitter_noise == 0:
            return x
        return x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, d_model]`` -> ``[T, E]`` float32 ``x W_g`` (float64 for float64 ``x``), outside autocast."""
        x = router_float(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, self.gate.weight.to(x.dtype))

    def route(self, logits: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        """The routing rule on ``logits`` ``[T, E]``; subclasses implement it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        """``x``: ``[T, d_model]``; ``token_mask``: ``[T]`` bool, ``False`` for padding (never routed).

        Returns the :class:`~moe_ref.routing.Routing` of the ``T`` tokens.
        """
        x, token_mask = self._check_input(x, token_mask)
        return self.route(self.logits(x), token_mask)

    def _check_input(self, x, token_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check ``x`` and ``token_mask``; return ``x`` with padding rows zeroed (whatever padding holds, NaN
        included, never reaches the logits, the losses or the gate's gradient) and the mask as ``[T]`` bool."""
        _checks.float_tensor("x", x, last_dim=self.d_model)
        if x.dim() != 2:
            raise ValueError(f"x must be [T, d_model], got shape {tuple(x.shape)}")
        token_mask = _checks.token_mask(token_mask, x.shape[:1], x.device)
        if token_mask is not None:
            x = torch.where(token_mask.unsqueeze(1), x, torch.zeros_like(x))
        return x, token_mask

    @torch.no_grad()
    def record_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Add ``tokens_per_expert`` ``[E]`` to the counts of :meth:`update_bias` (no-op without a bias)."""
        if self.has_bias:
            self.load_since_update += tokens_per_expert.to(self.load_since_update.device)

    @torch.no_grad()
    def update_bias(self) -> None:
        """``expert_bias += bias_update_rate * sign(mean load - load)``, then reset the counts.

        A no-op without a bias, or when no load was recorded since the last update.
        """
        if not self.has_bias:
            return
        load = self.load_since_update.to(self.expert_bias.dtype)
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token: ``2 * d_model * E``."""
        return 2 * self.d_model * self.num_experts

    def extra_repr(self) -> str:
        jitter = f", jitter_noise={self.jitter_noise}" if self.jitter_noise else ""
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}{jitter}"


class TopKRouter(Router):
    """Softmax then top-k (see :func:`~moe_ref.routing.softmax_topk`).

    Args:
        norm_topk_prob: renormalise the ``k`` kept weights; ``None`` (default) means ``k > 1``: Switch's raw
            probability for ``k = 1``, GShard and Mixtral's renormalised weights for ``k >= 2``.
        bias_update_rate: if > 0, select with the auxiliary-loss-free bias (see :class:`Router`):
            the top ``k`` of ``p + b``, weighted by the unbiased ``p``. 0 (default): plain top-k, no bias
            buffers.
        Others: as :class:`Router`.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, norm_topk_prob: bool | None = None,
                 bias_update_rate: float = 0.0, jitter_noise: float = 0.0):
        super().__init__(d_model, num_experts, k, jitter_noise=jitter_noise)
        self.norm_topk_prob = _checks.boolean("norm_topk_prob", k > 1 if norm_topk_prob is None else norm_topk_prob)
        if _checks.finite_float("bias_update_rate", bias_update_rate, minimum=0.0) > 0:
            self._add_bias(bias_update_rate)

    def route(self, logits: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        bias = self.expert_bias if self.has_bias else None
        return softmax_topk(logits, self.k, norm_topk_prob=self.norm_topk_prob,
                            expert_bias=bias).with_token_mask(token_mask)

    def extra_repr(self) -> str:
        bias = f", bias_update_rate={self.bias_update_rate}" if self.has_bias else ""
        return f"{super().extra_repr()}{bias}"


class NoisyTopKRouter(Router):
    """Noisy top-k gating: top k of ``x W_g + N(0, 1) * softplus(x W_noise)``.

    Introduced by :cite:t:`shazeer2017outrageously`. The noise is drawn only in training mode; in eval mode
    the router is plain softmax top-k. The weights are a softmax over the ``k`` kept logits. The paper's
    smooth "load" loss is not reproduced; use the balance loss of :mod:`moe_ref.losses`.

    Attributes:
        w_noise: ``[E, d_model]`` parameter, zero-initialised (so training starts with noise of scale
            ``softplus(0) = log 2``).
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, jitter_noise: float = 0.0):
        super().__init__(d_model, num_experts, k, jitter_noise=jitter_noise)
        self.w_noise = nn.Parameter(torch.zeros(num_experts, d_model))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.w_noise.zero_()

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        """As :meth:`Router.forward`; ``router_logits`` hold the noisy logits in training mode."""
        x, token_mask = self._check_input(x, token_mask)
        logits = self.logits(x)
        if self.training:
            x = router_float(x)
            with torch.autocast(x.device.type, enabled=False):
                logits = noisy_logits(logits, F.linear(x, self.w_noise.to(x.dtype)))
        return self.route(logits, token_mask)

    def route(self, logits: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        return softmax_topk(logits, self.k, norm_topk_prob=True).with_token_mask(token_mask)

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token: ``4 * d_model * E`` (the gate and the noise projection)."""
        return 2 * super().flops_per_token()


class SigmoidRouter(Router):
    """DeepSeek-V3's router (see :func:`~moe_ref.routing.sigmoid_grouped_topk`) with the auxiliary-loss-free
    bias update.

    Auxiliary-loss-free balancing (:cite:t:`wang2024auxfree`, used by DeepSeek-V3 :cite:p:`deepseekv3`),
    as described in :class:`Router`: the router always has the bias buffers (a ``transformers``
    DeepSeek-V3 gate's ``e_score_correction_bias`` loads into them), and ``bias_update_rate=0`` only stops
    the updates.

    Args:
        n_group, topk_group, routed_scaling_factor, norm_topk_prob, bias_update_rate: see
            :class:`RouterConfig`.

    Attributes:
        expert_bias: ``[E]`` float32 buffer, the selection bias (``e_score_correction_bias`` in
            ``transformers``).
        load_since_update: ``[E]`` int64 buffer, assignments counted since the last update. Saved in the
            state dict, so a checkpoint taken between updates resumes exactly.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True, bias_update_rate: float = 1e-3,
                 jitter_noise: float = 0.0):
        super().__init__(d_model, num_experts, k, jitter_noise=jitter_noise)
        check_groups(num_experts, k, n_group, topk_group)
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = _checks.finite_float("routed_scaling_factor", routed_scaling_factor,
                                                          minimum=0.0, strict=True)
        self.norm_topk_prob = _checks.boolean("norm_topk_prob", norm_topk_prob)
        self._add_bias(bias_update_rate)

    def route(self, logits: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        return sigmoid_grouped_topk(logits, self.k, expert_bias=self.expert_bias, n_group=self.n_group,
                                    topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                                    norm_topk_prob=self.norm_topk_prob).with_token_mask(token_mask)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_group={self.n_group}, topk_group={self.topk_group}, "
                f"routed_scaling_factor={self.routed_scaling_factor}, norm_topk_prob={self.norm_topk_prob}, "
                f"bias_update_rate={self.bias_update_rate}")


class ExpertChoiceRouter(Router):
    """Expert-choice routing :cite:p:`zhou2022expertchoice` (see :func:`~moe_ref.routing.expert_choice`).

    Each expert takes ``C = ceil(capacity_factor * T * k / E)`` (at most ``T``) of the ``T`` real tokens of
    the forward call, so a token gets ``k * capacity_factor`` experts on average.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, capacity_factor: float = 1.0,
                 jitter_noise: float = 0.0):
        super().__init__(d_model, num_experts, k, jitter_noise=jitter_noise)
        self.capacity_factor = _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)

    def route(self, logits: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        real = logits.shape[0] if token_mask is None else int(token_mask.sum())
        capacity = expert_choice_capacity(real, self.num_experts, self.k, self.capacity_factor)
        return expert_choice(logits, capacity, token_mask=token_mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"


def make_router(config: RouterConfig | str, d_model: int, num_experts: int, k: int) -> Router:
    """Build the router a :class:`RouterConfig` (or a kind name) describes."""
    c = RouterConfig.coerce(config)
    if c.kind == "softmax":
        return TopKRouter(d_model, num_experts, k, norm_topk_prob=c.norm_topk_prob,
                          bias_update_rate=c.bias_update_rate or 0.0, jitter_noise=c.jitter_noise)
    if c.kind == "noisy":
        return NoisyTopKRouter(d_model, num_experts, k, jitter_noise=c.jitter_noise)
    if c.kind == "sigmoid":
        norm = True if c.norm_topk_prob is None else c.norm_topk_prob
        return SigmoidRouter(d_model, num_experts, k, n_group=c.n_group, topk_group=c.topk_group,
                             routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=norm,
                             bias_update_rate=1e-3 if c.bias_update_rate is None else c.bias_update_rate,
                             jitter_noise=c.jitter_noise)
    return ExpertChoiceRouter(d_model, num_experts, k, capacity_factor=c.capacity_factor,
                              jitter_noise=c.jitter_noise)
