"""Chapter 2: the Mixture-of-Experts layer, a drop-in replacement for the dense :class:`~moe_ref.ffn.FFN`.

:class:`MoE` only composes the parts, each in its own module:

1. **route** (:mod:`moe_ref.routers`): ``x`` ``[T, d_model]`` -> :class:`~moe_ref.routing.Routing`;
2. **capacity** (:mod:`moe_ref.capacity`, optional): which assignments fit, a
   :class:`~moe_ref.capacity.CapacityRecord`;
3. **experts** (:mod:`moe_ref.experts`) run on their tokens by one of four implementations, ``impl``:
   ``"grouped"`` (sort, permute, grouped matmul, combine: :mod:`moe_ref.dispatch`), ``"naive"`` (a loop over
   experts, the reference), ``"einsum"`` and ``"padded"`` (fixed-size buffers: :mod:`moe_ref.padded`);
4. **dense paths** (:mod:`moe_ref.shared`): shared experts (DeepSeekMoE, Qwen2-MoE) or the residual MoE
   (DeepSpeed-MoE);
5. **auxiliary losses** (:mod:`moe_ref.losses`), attached to the output's gradient.

Configuration, and where the same setting lives in ``transformers`` configs and torchtitan's ``MoEArgs``:

.. list-table::
   :header-rows: 1

   * - ``MoE``
     - ``transformers``
     - torchtitan ``MoEArgs``
   * - ``d_hidden``
     - ``moe_intermediate_size``
     - (model ``moe_inter_dim``)
   * - ``num_experts``
     - ``num_local_experts`` / ``num_experts`` / ``n_routed_experts``
     - ``num_experts``
   * - ``k``
     - ``num_experts_per_tok``
     - ``top_k``
   * - ``router=RouterConfig(kind=...)``
     - (model type)
     - ``score_func``
   * - ``RouterConfig.norm_topk_prob``
     - ``norm_topk_prob``
     - ``route_norm``
   * - ``RouterConfig.routed_scaling_factor``
     - ``routed_scaling_factor``
     - ``route_scale``
   * - ``RouterConfig.n_group``, ``topk_group``
     - ``n_group``, ``topk_group``
     - ``num_expert_groups``, ``num_limited_groups``
   * - ``RouterConfig.bias_update_rate``
     - (training only)
     - ``load_balance_coeff``
   * - ``RouterConfig.jitter_noise``
     - ``router_jitter_noise``
     - --
   * - ``capacity=CapacityConfig(...)``
     - Switch ``expert_capacity``
     - --
   * - ``shared=SharedExpertConfig(num, d_hidden)``
     - ``n_shared_experts``, ``shared_expert_intermediate_size``
     - ``num_shared_experts``
   * - ``AuxLossConfig.balance_coef``
     - ``k * router_aux_loss_coef / L`` (``L`` MoE layers, pooled)
     - --
   * - ``AuxLossConfig.z_coef``
     - ``router_z_loss_coef``
     - --
   * - ``impl="grouped"``
     - ``_experts_implementation``
     - ``use_grouped_mm``

After a forward the layer keeps, detached from the autograd graph: ``last_routing`` (the
:class:`~moe_ref.routing.Routing`), ``last_capacity`` (the :class:`~moe_ref.capacity.CapacityRecord` or
``None``), ``losses`` (the unweighted losses computed) and ``aux_loss`` (their weighted sum, or ``None``).
Nothing on the module carries a graph, so it deep-copies, pickles and saves at any time.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .capacity import CapacityConfig, CapacityRecord, apply_capacity
from .counting import MoEParams, moe_flops, moe_params
from .dispatch import routed_decode, routed_grouped, routed_naive
from .experts import Experts
from .ffn import FFN
from .kernels.grouped_mm import check_backend
from .losses import AuxLossConfig, attach_aux_loss, aux_losses, weighted_aux_loss
from .padded import routed_einsum, routed_padded
from .routers import RouterConfig, make_router
from .routing import Routing
from .shared import ResidualConfig, SharedExpertConfig, add_dense_paths

#: The implementations of the routed experts, by the name ``impl`` takes.
IMPLS = {"grouped": routed_grouped, "naive": routed_naive, "einsum": routed_einsum, "padded": routed_padded}


def _optional(name: str, value, cls):
    if value is not None and not isinstance(value, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{name} must be {article} {cls.__name__} or None, got {type(value).__name__}")
    return value


def _sequence_length(shape: torch.Size, num_tokens: int) -> int:
    """Tokens per sequence of an input ``[..., S, d_model]``; a ``[T, d_model]`` input is one sequence."""
    return shape[-2] if len(shape) >= 3 else num_tokens


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing it.

    The autograd engine runs a graph task during backward, and only then; a recomputed forward (reentrant or
    not) runs inside it. ``torch._C._current_graph_task_id`` is private, so its absence means "no".
    """
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class MoE(nn.Module):
    """Mixture-of-Experts layer: ``[..., d_model] -> [..., d_model]``, same dtype; a drop-in FFN replacement.

    Each token goes to ``k`` of ``num_experts`` FFN experts chosen by a router; the output is the weighted
    sum of their outputs :cite:p:`shazeer2017outrageously`, plus the dense paths if configured. Dropless
    unless given a ``capacity``; pairs beyond it contribute zero (weights not renormalised) and are counted.

    Args:
        d_model: width of the residual stream.
        d_hidden: hidden width of each routed expert.
        num_experts: ``E``.
        k: experts per token, ``1 <= k <= E`` (the average, for expert choice).
        activation: of every expert, as for :class:`~moe_ref.ffn.FFN` (default ``"swiglu"``).
        router: a :class:`~moe_ref.routers.RouterConfig`, or a kind name for its defaults.
        capacity: a :class:`~moe_ref.capacity.CapacityConfig` (token-choice routers), or ``None``: dropless.
        shared: a :class:`~moe_ref.shared.SharedExpertConfig`, or ``None``.
        residual: a :class:`~moe_ref.shared.ResidualConfig`, or ``None``. Not with ``shared``.
        aux_losses: the :class:`~moe_ref.losses.AuxLossConfig` (default: balance coefficient 0.01), kept as
            ``loss_config``.
        impl: ``"grouped"`` (default), ``"naive"``, ``"einsum"`` or ``"padded"``; all compute the same function.
            ``"grouped"`` on the CPU without autograd and with at most :attr:`decode_max_tokens` tokens takes
            the decode fast path, :func:`~moe_ref.dispatch.routed_decode` (same function, one plain matmul
            per touched expert).
        backend: grouped-matmul backend of ``"grouped"`` (default: the best available).
        init_std: expert weight initialisation (see :class:`~moe_ref.experts.Experts`).
    """

    #: Largest token count of a call that takes the decode fast path (CPU, ``impl="grouped"``, default backend,
    #: no autograd); 0 turns the fast path off. Set on an instance to change it for one layer.
    decode_max_tokens: int = 64

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 2, *, activation: str = "swiglu",
                 router: RouterConfig | str = "softmax", capacity: CapacityConfig | None = None,
                 shared: SharedExpertConfig | None = None, residual: ResidualConfig | None = None,
                 aux_losses: AuxLossConfig | None = None, impl: str = "grouped", backend: str | None = None,
                 init_std: float | None = None):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.k = _checks.positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        self.activation = activation
        self.router_config = RouterConfig.coerce(router)
        self.capacity_config = _optional("capacity", capacity, CapacityConfig)
        if capacity is not None and self.router_config.kind == "expert_choice":
            raise ValueError("capacity applies to token-choice routers; expert choice sets its own with "
                             "RouterConfig(kind='expert_choice', capacity_factor=...)")
        self.shared_config = _optional("shared", shared, SharedExpertConfig)
        self.residual_config = _optional("residual", residual, ResidualConfig)
        if shared is not None and residual is not None:
            raise ValueError("residual already adds an always-on dense MLP; use it or shared, not both")
        self.loss_config = AuxLossConfig() if aux_losses is None else _optional("aux_losses", aux_losses,
                                                                                   AuxLossConfig)
        self.router = make_router(self.router_config, d_model, num_experts, k)
        self.experts = self._make_experts(d_model, d_hidden, num_experts, activation, init_std)
        self.shared = self.shared_gate = self.residual_mlp = self.residual_coef = None
        if shared is not None:
            self.shared = FFN(d_model, shared.num * (shared.d_hidden or d_hidden), activation)
            self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared.gate else None
        if residual is not None:
            self.residual_mlp = FFN(d_model, residual.d_hidden or d_hidden, activation)
            self.residual_coef = nn.Linear(d_model, 2)
        self.impl, self.backend = impl, backend
        self.last_routing: Routing | None = None
        self.last_capacity: CapacityRecord | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.aux_loss: torch.Tensor | None = None

    def _make_experts(self, d_model: int, d_hidden: int, num_experts: int, activation: str,
                      init_std: float | None) -> Experts:
        """The routed experts this module holds: all ``num_experts`` of them (expert parallelism holds a slice)."""
        return Experts(d_model, d_hidden, num_experts, activation, init_std)

    impl = property(lambda self: self._impl, lambda self, v: setattr(self, "_impl", _checks.choice("impl", v, IMPLS)),
                    doc="The implementation of the routed experts (a key of :data:`IMPLS`); checked when set.")
    backend = property(lambda self: self._backend, lambda self, v: setattr(self, "_backend", check_backend(v)),
                       doc="The grouped-matmul backend of ``impl='grouped'``; checked when set.")

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, *, return_losses: bool = False):
        """``x``: ``[..., d_model]``; ``token_mask``: ``[...]`` bool or 0/1, ``False`` for padding.

        Padding tokens are not routed (their routed output is 0), take no capacity and count in no loss or
        statistic. Returns ``[..., d_model]`` in the dtype of ``x``, with the weighted auxiliary losses'
        gradient attached; with ``return_losses``, ``(output, losses)`` instead: every unweighted loss, with
        its graph, and nothing attached, for callers that add the losses themselves.
        """
        _checks.float_tensor("x", x, last_dim=self.d_model)
        _checks.matches_module("x", x, self.experts.w_in)
        mask = _checks.token_mask(token_mask, x.shape[:-1], x.device)
        x_flat = x.reshape(-1, self.d_model)  # [T, d_model]
        x_router = self.router.jitter(x_flat)
        routing = self.router(x_router, mask)
        capacity = self._capacity(routing, x.shape)
        out = self._routed(x_router if self.router_config.jitter_experts else x_flat, routing, capacity)
        out = add_dense_paths(x_flat, out, shared=self.shared, shared_gate=self.shared_gate,
                              residual_mlp=self.residual_mlp, residual_coef=self.residual_coef)
        losses = aux_losses(routing, self.loss_config, _sequence_length(x.shape, routing.num_tokens), mask,
                            every=return_losses, balance=self.router_config.kind != "expert_choice")
        aux = weighted_aux_loss(losses, self.loss_config)
        self._record(routing, capacity, losses, aux)
        if aux is not None and not return_losses:
            out = attach_aux_loss(out, aux, self.loss_config.scale)
        # a new tensor, never a view: FSDP's hooks would be lost on an in-place op on a view
        out = out.reshape(x.shape).to(x.dtype, copy=True)
        return (out, losses) if return_losses else out

    def _capacity(self, routing: Routing, shape: torch.Size) -> CapacityRecord | None:
        config = self.capacity_config
        if config is None:
            return None
        T = routing.num_tokens
        group_size = _sequence_length(shape, T) if config.group == "sequence" else T
        slots = config.slots(group_size, self.num_experts, self.k)
        return apply_capacity(routing, slots, group_size=max(group_size, 1), drop_priority=config.drop_priority)

    def _routed(self, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None) -> torch.Tensor:
        """The routed experts' output ``[T, d_model]`` in float32 (float64), computed in the autocast dtype."""
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):  # every implementation casts the same way, explicitly
            if self._decoding(x):
                return routed_decode(self.experts, x, routing, capacity)
            return IMPLS[self.impl](self.experts, x, routing, capacity, self.backend)

    def _decoding(self, x: torch.Tensor) -> bool:
        """Whether this call takes the decode fast path: few tokens on the CPU, the default grouped path, no
        autograd (the per-expert loop reads the group sizes on the host: free on the CPU, a sync on a GPU)."""
        return (self.impl == "grouped" and self.backend is None and x.device.type == "cpu"
                and x.shape[0] <= self.decode_max_tokens and not torch.is_grad_enabled())

    def _record(self, routing: Routing, capacity: CapacityRecord | None, losses: dict,
                aux: torch.Tensor | None) -> None:
        """Keep detached statistics of this forward; count the load for the bias update (once per step)."""
        self.last_routing, self.last_capacity = routing.detach(), capacity
        self.losses = {name: loss.detach() for name, loss in losses.items()}
        self.aux_loss = None if aux is None else aux.detach()
        if self.training and not _recomputing():
            self.router.record_load(routing.tokens_per_expert)

    @property
    def tokens_per_expert(self) -> torch.Tensor | None:
        """``[E]`` the router's assignments per expert in the last forward (before capacity drops)."""
        return None if self.last_routing is None else self.last_routing.tokens_per_expert

    @property
    def num_dropped(self) -> int | None:
        """(token, expert) pairs dropped by the capacity in the last forward; 0 dropless, ``None`` before any."""
        if self.last_routing is None:
            return None
        return 0 if self.last_capacity is None else self.last_capacity.num_dropped

    @property
    def drop_rate(self) -> float | None:
        """Fraction of the router's assignments dropped in the last forward (``None`` before any)."""
        if self.last_routing is None:
            return None
        return 0.0 if self.last_capacity is None else self.last_capacity.drop_rate

    @property
    def tokens_dropped(self) -> int | None:
        """Tokens whose every assignment was dropped in the last forward, so their routed output is 0."""
        if self.last_routing is None:
            return None
        return 0 if self.last_capacity is None else self.last_capacity.tokens_dropped

    def after_optimizer_step(self) -> None:
        """Training-loop hook: the sigmoid router's auxiliary-loss-free bias update; a no-op otherwise."""
        self.router.update_bias()

    def reset_parameters(self) -> None:
        """Re-initialise every part (e.g. after ``to_empty`` from the meta device)."""
        for part in (self.router, self.experts, self.shared, self.shared_gate, self.residual_mlp, self.residual_coef):
            if part is not None:
                part.reset_parameters()

    def _count_args(self) -> dict:
        shared, residual = self.shared_config, self.residual_config
        return dict(router=self.router_config.kind, n_shared=shared.num if shared else 0,
                    d_shared=shared.d_hidden if shared else None, shared_gate=bool(shared and shared.gate),
                    residual=residual is not None, d_residual=residual.d_hidden if residual else None,
                    capacity_factor=self.router_config.capacity_factor)

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token of the *active* path (:func:`~moe_ref.counting.moe_flops`)."""
        return moe_flops(self.d_model, self.d_hidden, self.num_experts, self.k, self.activation, **self._count_args())

    def param_counts(self) -> MoEParams:
        """``MoEParams(total, active)`` (:func:`~moe_ref.counting.moe_params`)."""
        return moe_params(self.d_model, self.d_hidden, self.num_experts, self.k, self.activation,
                          **self._count_args())

    def extra_repr(self) -> str:
        capacity = f", capacity={self.capacity_config}" if self.capacity_config else ""
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"router={self.router_config.kind!r}, impl={self.impl!r}{capacity}")
