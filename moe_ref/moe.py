"""Chapter 2: the Mixture-of-Experts layer, a drop-in replacement for the dense :class:`~moe_ref.ffn.FFN`.

One forward is five small steps, each a function or method with named tensors:

1. **route**: the router turns ``x`` ``[T, d_model]`` into a :class:`~moe_ref.routing.Routing` record
   (``expert_indices``, ``combine_weights``, ``tokens_per_expert``...).
2. **sort** (:func:`sort_by_expert`): the (token, expert) assignments are sorted by expert into a
   :class:`DispatchPlan` with the group boundaries ``offsets``. A capacity limit (tokens dropped when an
   expert is full) would act here, on the plan, between routing and expert compute.
3. **permute** (:func:`permute`): gather the token vectors in plan order, ``x_sorted`` ``[A, d_model]``.
4. **expert compute** (:meth:`Experts.forward`): one grouped matmul per projection over the ragged groups
   (:func:`~moe_ref.grouped_mm.grouped_mm`).
5. **combine** (:func:`combine`): scale each output by its combine weight and scatter-add it back to its
   token.

The per-expert loop of :meth:`MoE.experts_naive` computes the same thing the obvious way and is kept as the
readable reference (``impl="naive"``). By default no token is ever dropped (a "dropless" MoE): every
assignment the router makes is computed.

Chapter 4 adds an optional expert capacity (``capacity_factor`` or ``capacity``, :mod:`moe_ref.capacity`):
between steps 1 and 2 the pairs that do not fit are dropped from the routing record, so every
implementation (``impl``) computes the same drops; and two padded implementations with fixed-size expert
buffers, GShard's one-hot einsum form and an index form (:mod:`moe_ref.dispatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import _checks
from .capacity import CAPACITY_GROUPS, DROP_PRIORITIES, apply_capacity, expert_capacity
from .counting import MoEParams, moe_flops, moe_params
from .ffn import FFN, activation_fn
from .dispatch import moe_einsum, moe_padded
from .grouped_mm import ALL_BACKENDS, _grouped_mm, grouped_mm
from .losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from .routing import ROUTERS, Routing, make_router

#: Router options and the routers they apply to.
_ROUTER_OPTIONS = {
    "norm_topk_prob": ("softmax", "sigmoid"),
    "n_group": ("sigmoid",),
    "topk_group": ("sigmoid",),
    "routed_scaling_factor": ("sigmoid",),
    "bias_update_rate": ("sigmoid",),
}

#: Values of the ``impl`` argument of :class:`MoE`.
IMPLS = ("grouped", "naive", "einsum", "padded")


@dataclass
class DispatchPlan:
    """The router's assignments sorted by expert: what the grouped expert compute needs.

    Attributes:
        token_ids: ``[A]`` int64, the token of each sorted assignment (a row of ``x_sorted``).
        expert_ids: ``[A]`` int64, its expert, non-decreasing.
        combine_weights: ``[A]`` float32, its combine weight.
        tokens_per_expert: ``[E]`` int64, the size of each expert's group.
        offsets: ``[E]`` int32, cumulative group ends (``offsets[-1] == A``), as
            :func:`~moe_ref.grouped_mm.grouped_mm` takes them.
    """

    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    combine_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    offsets: torch.Tensor


def sort_by_expert(routing: Routing) -> DispatchPlan:
    """Step 2: sort the (token, expert) assignments of ``routing`` by expert.

    The sort is stable, so within an expert's group the tokens keep their order (and the result is
    deterministic).
    """
    token_ids, expert_ids, weights = routing.assignments()
    order = torch.argsort(expert_ids, stable=True)
    tokens_per_expert = torch.bincount(expert_ids, minlength=routing.num_experts)
    return DispatchPlan(token_ids=token_ids[order], expert_ids=expert_ids[order], combine_weights=weights[order],
                        tokens_per_expert=tokens_per_expert,
                        offsets=tokens_per_expert.cumsum(0).to(torch.int32))


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Step 3: ``x`` ``[T, d]`` -> ``x_sorted`` ``[A, d]``, row ``a`` being token ``plan.token_ids[a]``."""
    return x.index_select(0, plan.token_ids)


def combine(y_sorted: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Step 5: ``y_sorted`` ``[A, d]`` -> ``[num_tokens, d]``, the combine-weighted sum of each token's rows.

    A token with no assignment (expert choice, or all its pairs dropped by a capacity) gets zeros.
    """
    weighted = y_sorted * plan.combine_weights.unsqueeze(-1).to(y_sorted.dtype)
    out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    return out.index_add_(0, plan.token_ids, weighted)  # in place: the zeros are ours, no copy needed


class Experts(nn.Module):
    """``E`` FFN experts with their weights stacked: ``[E, d_model, d_hidden]`` in, ``[E, d_hidden, d_model]`` out.

    Expert ``e`` computes ``act(x @ w_in[e]) @ w_out[e]`` (plain) or ``(act(x @ w_in[e]) * (x @ w_up[e])) @
    w_out[e]`` (gated), as :class:`~moe_ref.ffn.FFN` does with the weight matrices stored input-major.

    Args:
        d_model: width of the token vectors.
        d_hidden: hidden width of each expert.
        num_experts: ``E``.
        activation: as for :class:`~moe_ref.ffn.FFN`.
        init_std: initialise the weights from ``N(0, init_std^2)``; ``None`` (default) uses the
            initialisation ``nn.Linear`` would give each expert matrix (uniform in ``+-1/sqrt(fan_in)``).

    Attributes:
        w_in: ``[E, d_model, d_hidden]``, the gate projection in the gated form.
        w_up: ``[E, d_model, d_hidden]`` in the gated form, ``None`` otherwise.
        w_out: ``[E, d_hidden, d_model]``.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, activation: str = "swiglu",
                 init_std: float | None = None):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.activation = activation
        self.act, self.gated = activation_fn(activation)
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_hidden)) if self.gated else None
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float | None = None) -> None:
        """Re-initialise the expert weights (see the ``init_std`` argument)."""
        for w in (self.w_in, self.w_up, self.w_out):
            if w is None:
                continue
            if init_std is None:
                bound = 1 / math.sqrt(w.shape[1])  # fan_in is the middle (input) dimension
                w.uniform_(-bound, bound)
            else:
                w.normal_(0.0, _checks.finite_float("init_std", init_std, minimum=0.0))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor, backend: str | None = None, *,
                check: bool = True) -> torch.Tensor:
        """Step 4: all experts on their groups of rows, one grouped matmul per projection.

        Args:
            x_sorted: ``[A, d_model]``, rows grouped by expert.
            offsets: ``[E]`` int32 cumulative group ends.
            backend: passed to :func:`~moe_ref.grouped_mm.grouped_mm`.
            check: validate the inputs (reads ``offsets`` on the host: a synchronisation on a GPU).
                :meth:`MoE.experts_grouped` turns it off for the offsets it computed itself.

        Returns:
            ``[A, d_model]``, row ``a`` being its expert's output for row ``a`` of ``x_sorted``.
        """
        def gmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return grouped_mm(x, w, offsets, backend=backend) if check else _grouped_mm(x, w, offsets, backend)

        hidden = self.act(gmm(x_sorted, self.w_in))
        if self.gated:
            hidden = hidden * gmm(x_sorted, self.w_up)
        return gmm(hidden, self.w_out)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x`` ``[n, d_model]``: the FFN formula with ordinary matmuls."""
        hidden = self.act(x @ self.w_in[e])
        if self.gated:
            hidden = hidden * (x @ self.w_up[e])
        return hidden @ self.w_out[e]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}")


class MoE(nn.Module):
    """Mixture-of-Experts layer: ``[..., d_model] -> [..., d_model]``, same dtype; a drop-in FFN replacement.

    Each token goes to ``k`` of ``num_experts`` FFN experts chosen by a router; the output is the weighted
    sum of their outputs (Shazeer et al. 2017), plus always-on experts if configured. Dropless by default: no
    capacity limit, no token dropped. With ``capacity_factor`` or ``capacity``, a token-choice router's
    experts each take at most ``C`` (token, expert) pairs per group (:mod:`moe_ref.capacity`); the pairs
    beyond contribute zero (the kept weights are not renormalised), so the residual stream carries the
    token through.

    Args:
        d_model: width of the residual stream.
        d_hidden: hidden width of each routed expert.
        num_experts: ``E``, the number of routed experts.
        k: experts per token, ``1 <= k <= E`` (the average, for expert choice).
        activation: activation of every expert, as for :class:`~moe_ref.ffn.FFN` (default ``"swiglu"``).
        router: ``"softmax"`` (default), ``"noisy"``, ``"sigmoid"`` or ``"expert_choice"``
            (see :mod:`moe_ref.routing`).
        norm_topk_prob: ``"softmax"`` and ``"sigmoid"`` routers: renormalise the ``k`` weights
            (default: ``k > 1`` for softmax, ``True`` for sigmoid).
        n_group: ``"sigmoid"`` router: expert groups (default 1).
        topk_group: ``"sigmoid"`` router: groups kept per token (default 1).
        routed_scaling_factor: ``"sigmoid"`` router: scale of the routing weights (default 1.0).
        bias_update_rate: ``"sigmoid"`` router: step of the auxiliary-loss-free bias update (default 0.001).
        capacity_factor: the capacity ``C = ceil(capacity_factor * S * k / E)`` per expert and group of ``S``
            tokens (:func:`~moe_ref.capacity.expert_capacity`). Token-choice routers: ``None`` (default) is
            dropless. ``"expert_choice"`` router: the tokens each expert takes, over all ``T`` tokens (default
            1.0); the same formula (:func:`~moe_ref.routing.expert_choice_capacity`).
        capacity: token-choice routers: an explicit capacity per expert and group, instead of
            ``capacity_factor`` (e.g. Switch's ``expert_capacity``).
        min_capacity: token-choice routers: a floor on the capacity (default 0; DeepSpeed-MoE uses 4).
        capacity_group: token-choice routers with a capacity: count it per ``"sequence"`` (default; as the
            ``transformers`` port of Switch) or over the whole ``"batch"`` of the forward call.
        drop_priority: token-choice routers with a capacity: which pairs an expert serves first,
            ``"position"`` (default), ``"choice"`` (GShard) or ``"score"`` (V-MoE's batch-prioritised routing;
            see :mod:`moe_ref.capacity`).
        n_shared: number of shared experts that process every token (Dai et al. 2024, DeepSeekMoE), each of
            width ``d_shared``; their sum is computed as one FFN of width ``n_shared * d_shared``, which is the
            same function.
        d_shared: hidden width of each shared expert (default ``d_hidden``).
        shared_gate: scale the shared experts' output by ``sigmoid(x w_shared_gate)``, a learned per-token
            scalar (Qwen2-MoE).
        residual: DeepSpeed-MoE's residual MoE (Rajbhandari et al. 2022): ``c0 * MLP(x) + c1 * MoE(x)`` with
            ``(c0, c1) = softmax(Linear(x, 2))``. Cannot be combined with shared experts.
        d_residual: hidden width of the residual MLP (default ``d_hidden``).
        balance_coef: weight of :func:`~moe_ref.losses.load_balancing_loss` in ``aux_loss`` (default 0.01).
        z_coef: weight of :func:`~moe_ref.losses.router_z_loss` (default 0; ST-MoE uses 0.001).
        seq_balance_coef: weight of :func:`~moe_ref.losses.sequence_balance_loss` (default 0; DeepSeek-V3
            uses 0.0001).
        impl: ``"grouped"`` (default: sort, grouped matmuls), ``"naive"`` (a loop over the experts),
            ``"einsum"`` (GShard's one-hot dispatch and combine, padded ``bmm`` experts) or ``"padded"``
            (index dispatch into the same padded buffers); see :mod:`moe_ref.dispatch`. All compute the
            same function.
        backend: grouped matmul backend, ``"loop"``, ``"torch"``, ``"triton"`` or ``None`` for the best
            available (see :mod:`moe_ref.grouped_mm`).
        init_std: initialisation of the routed experts (see :class:`Experts`).

    Attributes:
        router: the :class:`~moe_ref.routing.Router` (its gate is ``router.gate``, an ``nn.Linear``).
        experts: the routed :class:`Experts`.
        shared: the shared experts as one :class:`~moe_ref.ffn.FFN`, or ``None``.
        shared_gate: ``nn.Linear(d_model, 1)`` without bias, or ``None``.
        residual_mlp: the dense :class:`~moe_ref.ffn.FFN` of the residual MoE, or ``None``.
        residual_coef: ``nn.Linear(d_model, 2)`` giving the residual MoE's mixing logits, or ``None``.
        last_routing: the :class:`~moe_ref.routing.Routing` of the last forward (``None`` before any).
        tokens_per_expert: ``[E]`` int64 assignments per expert in the last forward, as the router made
            them (before any capacity drop; ``last_routing.kept_per_expert`` counts after).
        losses: unweighted loss values of the last forward: ``{"balance", "seq_balance", "z"}`` (only
            ``"z"`` for expert choice, balanced by construction; empty for an input without tokens), scalar
            float32 tensors.
        aux_loss: ``balance_coef * balance + seq_balance_coef * seq_balance + z_coef * z`` over the non-zero
            coefficients, or ``None`` when all are 0; the training loop adds it to the LM loss.

    After a forward, the properties :attr:`num_dropped`, :attr:`drop_rate` and :attr:`tokens_dropped` report
    the capacity drops (0 when dropless), and ``last_routing.dropped`` ``[T, k]`` says which pairs.

    The sequence-wise loss needs sequences: a ``[B, S, d_model]`` input (or ``[..., S, d_model]``) has ``B``
    sequences of ``S`` tokens; a ``[T, d_model]`` input counts as one sequence.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 2, *, activation: str = "swiglu",
                 router: str = "softmax", norm_topk_prob: bool | None = None, n_group: int | None = None,
                 topk_group: int | None = None, routed_scaling_factor: float | None = None,
                 bias_update_rate: float | None = None, capacity_factor: float | None = None,
                 capacity: int | None = None, min_capacity: int = 0, capacity_group: str = "sequence",
                 drop_priority: str = "position", n_shared: int = 0, d_shared: int | None = None,
                 shared_gate: bool = False, residual: bool = False, d_residual: int | None = None,
                 balance_coef: float = 0.01, z_coef: float = 0.0, seq_balance_coef: float = 0.0,
                 impl: str = "grouped", backend: str | None = None, init_std: float | None = None):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.k = _checks.positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        activation_fn(activation)
        self.activation = activation
        self.router_name = _checks.choice("router", router, ROUTERS)
        options = dict(norm_topk_prob=norm_topk_prob, n_group=n_group, topk_group=topk_group,
                       routed_scaling_factor=routed_scaling_factor, bias_update_rate=bias_update_rate)
        options = {name: value for name, value in options.items() if value is not None}
        for name in options:
            if router not in _ROUTER_OPTIONS[name]:
                raise ValueError(f"{name} applies only to router in {_ROUTER_OPTIONS[name]}, got router={router!r}")
        self._init_capacity(capacity_factor, capacity, min_capacity, capacity_group, drop_priority)
        if router == "expert_choice":
            options["capacity_factor"] = self.capacity_factor
        self.router = make_router(router, d_model, num_experts, k, **options)
        self.experts = Experts(d_model, d_hidden, num_experts, activation, init_std)

        self.n_shared = _checks.positive_int("n_shared", n_shared, minimum=0)
        self.d_shared = d_hidden if d_shared is None else _checks.positive_int("d_shared", d_shared)
        self.has_shared_gate = _bool("shared_gate", shared_gate)
        if shared_gate and not n_shared:
            raise ValueError("shared_gate=True needs shared experts (n_shared >= 1)")
        self.shared = FFN(d_model, n_shared * self.d_shared, activation) if n_shared else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None

        self.residual = _bool("residual", residual)
        if residual and n_shared:
            raise ValueError("residual=True already adds an always-on dense MLP; use it or n_shared, not both")
        self.d_residual = d_hidden if d_residual is None else _checks.positive_int("d_residual", d_residual)
        self.residual_mlp = FFN(d_model, self.d_residual, activation) if residual else None
        self.residual_coef = nn.Linear(d_model, 2) if residual else None

        self.loss_coefs = {name: _checks.finite_float(f"{name}_coef", coef, minimum=0.0)
                           for name, coef in (("balance", balance_coef), ("seq_balance", seq_balance_coef),
                                              ("z", z_coef))}
        self.impl = _checks.choice("impl", impl, IMPLS)
        if backend is not None:
            _checks.choice("backend", backend, ALL_BACKENDS)
        self.backend = backend

        self.last_routing: Routing | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.losses: dict = {}
        self.aux_loss: torch.Tensor | None = None

    # --- forward -------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_model]`` floating point. Returns ``[..., d_model]`` of the same dtype.

        Also sets ``last_routing``, ``tokens_per_expert``, ``losses`` and ``aux_loss`` (and so ``num_dropped``,
        ``drop_rate``, ``tokens_dropped``).
        """
        _checks.float_tensor("x", x, last_dim=self.d_model)
        x_flat = x.reshape(-1, self.d_model)  # [T, d_model]
        routing = self.router(x_flat)
        if self.capacity_limited:
            routing = self.limit_capacity(routing, x.shape)
        if self.impl == "naive":
            out = self.experts_naive(x_flat, routing)
        elif self.impl == "einsum":
            out = moe_einsum(self.experts, x_flat, routing)
        elif self.impl == "padded":
            out = moe_padded(self.experts, x_flat, routing)
        else:
            out = self.experts_grouped(x_flat, routing)
        if self.residual_mlp is not None:
            coef = torch.softmax(self.residual_coef(x_flat).float(), dim=-1).to(x.dtype)  # [T, 2]
            out = coef[:, :1] * self.residual_mlp(x_flat) + coef[:, 1:] * out
        if self.shared is not None:
            shared_out = self.shared(x_flat)
            if self.shared_gate is not None:
                shared_out = torch.sigmoid(self.shared_gate(x_flat)) * shared_out
            out = out + shared_out
        self._record(routing, x.shape)
        return out.reshape(x.shape)

    def experts_grouped(self, x_flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed experts, the fast way: sort, permute, grouped matmuls, combine. ``[T, d] -> [T, d]``."""
        # A capacity limit has already removed the dropped pairs from ``routing`` (``mask``, see
        # :meth:`limit_capacity`), so the plan holds only the kept ones: the trimming happens in the sort.
        plan = sort_by_expert(routing)
        x_sorted = permute(x_flat, plan)
        y_sorted = self.experts(x_sorted, plan.offsets, backend=self.backend, check=False)
        return combine(y_sorted, plan, x_flat.shape[0])

    def limit_capacity(self, routing: Routing, shape: torch.Size) -> Routing:
        """Apply the capacity limit to a token-choice ``routing`` of an input of ``shape`` ``[..., d_model]``.

        The groups are the sequences (``shape[-2]`` tokens each; a ``[T, d_model]`` input is one sequence) or
        the whole batch, per ``capacity_group``; the capacity is :func:`~moe_ref.capacity.expert_capacity` of
        the group size. Returns :func:`~moe_ref.capacity.apply_capacity`'s record.
        """
        T = routing.num_tokens
        group_size = _sequence_length(shape, T) if self.capacity_group == "sequence" else T
        capacity = expert_capacity(group_size, self.num_experts, self.k, capacity_factor=self.capacity_factor,
                                   capacity=self.capacity, min_capacity=self.min_capacity)
        return apply_capacity(routing, capacity, group_size=max(group_size, 1), drop_priority=self.drop_priority)

    def experts_naive(self, x_flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Routed experts, the readable reference: a loop over the experts. ``[T, d] -> [T, d]``.

        For each expert, find the (token, slot) pairs routed to it, run it on those tokens and add its
        weighted output to theirs.
        """
        out = torch.zeros_like(x_flat)
        selected = routing.expert_indices.unsqueeze(-1) == torch.arange(self.num_experts, device=x_flat.device)
        if routing.mask is not None:
            selected = selected & routing.mask.unsqueeze(-1)  # [T, k, E]
        for e in range(self.num_experts):
            token_ids, slots = torch.nonzero(selected[:, :, e], as_tuple=True)
            if token_ids.numel() == 0:
                continue
            weights = routing.combine_weights[token_ids, slots].unsqueeze(-1).to(x_flat.dtype)
            out = out.index_add(0, token_ids, weights * self.experts.expert(e, x_flat[token_ids]))
        return out

    def _record(self, routing: Routing, shape: torch.Size) -> None:
        """Keep the routing, the unweighted losses and the weighted ``aux_loss`` of this forward."""
        self.last_routing = routing
        self.tokens_per_expert = routing.tokens_per_expert
        T, E, k = routing.num_tokens, routing.num_experts, routing.k
        losses = {}
        if T > 0:  # an empty input has no losses (they would be 0 / 0)
            losses["z"] = router_z_loss(routing.router_logits)
        if T > 0 and self.router_name != "expert_choice":  # expert choice is balanced by construction
            seq_len = _sequence_length(shape, T)
            batch = T // seq_len
            losses["balance"] = load_balancing_loss(routing.router_probs, routing.expert_indices)
            losses["seq_balance"] = sequence_balance_loss(
                routing.router_probs.reshape(batch, seq_len, E), routing.expert_indices.reshape(batch, seq_len, k))
        self.losses = losses
        weighted = [coef * losses[name] for name, coef in self.loss_coefs.items() if coef > 0 and name in losses]
        self.aux_loss = torch.stack(weighted).sum() if weighted else None

    # --- capacity -----------------------------------------------------------------------------------------

    def _init_capacity(self, capacity_factor, capacity, min_capacity, capacity_group, drop_priority) -> None:
        """Check and store the capacity arguments (see the class docstring)."""
        if capacity_factor is not None:
            capacity_factor = _checks.finite_float("capacity_factor", capacity_factor, minimum=0.0, strict=True)
        if capacity is not None:
            _checks.positive_int("capacity", capacity)
            if capacity_factor is not None:
                raise ValueError("give capacity_factor or capacity, not both")
        _checks.positive_int("min_capacity", min_capacity, minimum=0)
        self.capacity_group = _checks.choice("capacity_group", capacity_group, CAPACITY_GROUPS)
        self.drop_priority = _checks.choice("drop_priority", drop_priority, DROP_PRIORITIES)
        if self.router_name == "expert_choice":
            defaults = (("capacity", capacity, None), ("min_capacity", min_capacity, 0),
                        ("capacity_group", capacity_group, "sequence"), ("drop_priority", drop_priority, "position"))
            given = [name for name, value, default in defaults if value != default]
            if given:
                raise ValueError(f"{given[0]} applies only to token-choice routers (softmax, noisy, sigmoid); "
                                 "expert choice takes capacity_factor alone")
            capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        self.capacity_factor = capacity_factor
        self.capacity = capacity
        self.min_capacity = min_capacity

    @property
    def capacity_limited(self) -> bool:
        """Whether a capacity limit applies to the router's pairs (a token-choice router with a capacity)."""
        return self.router_name != "expert_choice" and (self.capacity_factor is not None or self.capacity is not None)

    @property
    def num_dropped(self) -> int | None:
        """Number of (token, expert) pairs dropped by the capacity limit in the last forward (0 when dropless,
        ``None`` before any forward)."""
        return None if self.last_routing is None else self.last_routing.num_dropped

    @property
    def drop_rate(self) -> float | None:
        """Fraction of the ``T * k`` pairs the router chose that were dropped in the last forward (``None``
        before any)."""
        return None if self.last_routing is None else self.last_routing.drop_rate

    @property
    def tokens_dropped(self) -> int | None:
        """Tokens whose every pair was dropped in the last forward, so their routed output is 0."""
        if self.last_routing is None:
            return None
        dropped = self.last_routing.dropped
        return 0 if dropped is None else int(dropped.all(dim=1).sum())

    # --- hooks and counts ----------------------------------------------------------------------------------

    def after_optimizer_step(self) -> None:
        """Training-loop hook: the sigmoid router's auxiliary-loss-free bias update; a no-op otherwise."""
        self.router.after_optimizer_step()

    def _count_args(self) -> dict:
        return dict(router=self.router_name, n_shared=self.n_shared, d_shared=self.d_shared,
                    shared_gate=self.has_shared_gate, residual=self.residual, d_residual=self.d_residual,
                    capacity_factor=self.capacity_factor if self.router_name == "expert_choice" else 1.0)

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token of the *active* path (:func:`~moe_ref.counting.moe_flops`)."""
        return moe_flops(self.d_model, self.d_hidden, self.num_experts, self.k, self.activation,
                         **self._count_args())

    def param_counts(self) -> MoEParams:
        """``MoEParams(total, active)`` (:func:`~moe_ref.counting.moe_params`)."""
        return moe_params(self.d_model, self.d_hidden, self.num_experts, self.k, self.activation,
                          **self._count_args())

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"router={self.router_name!r}, impl={self.impl!r}" + self._capacity_repr())

    def _capacity_repr(self) -> str:
        if not self.capacity_limited:
            return ""
        limit = (f"capacity={self.capacity}" if self.capacity is not None
                 else f"capacity_factor={self.capacity_factor}")
        return (f", {limit}, min_capacity={self.min_capacity}, capacity_group={self.capacity_group!r}, "
                f"drop_priority={self.drop_priority!r}")


def _sequence_length(shape: torch.Size, num_tokens: int) -> int:
    """Tokens per sequence of an input of ``shape`` ``[..., S, d_model]``; a ``[T, d_model]`` input is one sequence."""
    return shape[-2] if len(shape) >= 3 else num_tokens


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
