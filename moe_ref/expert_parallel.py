"""Chapter 9: expert parallelism. Each of ``W`` ranks holds ``E / W`` experts; tokens travel to their experts.

:class:`ExpertParallelMoE` is :class:`~moe_ref.moe.MoE` with the routed experts spread over the ranks of a
process group. Every rank routes its own tokens; only the routed experts' step changes, into five small steps
(torchtitan and DeepSpeed-MoE :cite:p:`rajbhandari2022deepspeedmoe` do the same):

1. **sort** (:func:`~moe_ref.dispatch.sort_by_expert`): the rank's (token, expert) pairs, sorted by expert.
   Rank ``r`` holds experts ``r * E/W, ..., (r + 1) * E/W - 1``, so the sorted rows are also grouped by the
   rank they go to.
2. **exchange counts**: one ``all_to_all_single`` of ``[W, E/W]`` integers tells every rank how many rows it
   will receive for each of its experts from each rank (the split sizes of the next step).
3. **dispatch**: ``all_to_all_single`` with uneven splits sends each row to its expert's rank.
4. **experts**: each rank reorders what it received from source-major to expert-major and runs its experts
   with one grouped matmul per projection (:meth:`~moe_ref.experts.Experts.forward`).
5. **combine**: a second ``all_to_all_single``, with the splits swapped, brings every output row home; the
   home rank weights and sums them (:func:`~moe_ref.dispatch.combine`).

The backward of an all-to-all is the all-to-all with the splits swapped, so autograd runs the same two
exchanges in reverse order. The communication is ``torch.distributed``'s own collective, the same call with
gloo (CPU processes) and NCCL (GPUs); the layer adds only the autograd rule and a timeout.

**What is the same as the single-process layer.** On every rank the output equals ``MoE(x_rank)`` with the
same weights, and so do the auxiliary losses (computed on the rank's own tokens). An expert's weight
gradient sums the contributions of the tokens of every rank; :func:`reduce_gradients` then adds (or averages)
the other gradients over the ranks, so a training step equals data-parallel training of the plain layer.

**Capacity.** ``capacity_scope="rank"`` applies the layer's :class:`~moe_ref.capacity.CapacityConfig` to each
rank's tokens, as the plain layer would; then a rank sends at most ``C`` rows to each expert and an expert
receives at most ``W * C``, the fixed buffers of GShard :cite:p:`lepikhin2021gshard` and Switch
:cite:p:`fedus2022switch`. ``capacity_scope="global"`` (with ``group="batch"``) fills each expert's
``C`` slots of the whole group's tokens in one priority order, as the plain layer would on the ranks' tokens
concatenated: it gathers the ``[T, k]`` expert choices of every rank (integers, not vectors) to decide.
Either way the dropped pairs are counted over all ranks and reported the same on every rank.

**Node-limited routing.** DeepSeek-V3 :cite:p:`deepseekv3` sends each token to experts on at most ``M``
nodes: the group-limited sigmoid router (:func:`~moe_ref.routing.sigmoid_grouped_topk`) with one group per
rank (:func:`node_limited`). :func:`ranks_per_token` measures the fan-out.

**Failure.** A process group that is not initialised, ``E`` not divisible by ``W``, or configurations that
differ across ranks (one fingerprint exchanged at construction) raise a ``ValueError`` on every rank; so does
an input whose dtype differs across ranks (the dtype travels with the counts). Every collective waits at most
``timeout`` seconds, so a rank that died makes the others raise instead of waiting for ever.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import _checks
from .capacity import CapacityRecord, queue_positions
from .dispatch import combine, permute, sort_by_expert
from .experts import Experts
from .moe import MoE
from .routers import RouterConfig
from .routing import Routing

#: Values of ``capacity_scope``.
CAPACITY_SCOPES = ("rank", "global")
#: Seconds any collective of the layer may wait before it raises.
DEFAULT_TIMEOUT = 300.0
# dtypes a rank can tell the others about in one integer
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ExpertParallelGroups:
    """The process groups of expert parallelism, and this rank's place in them.

    Attributes:
        expert: the ``W`` ranks that share the experts out; rank ``r`` of it holds experts
            ``r * E/W ... (r + 1) * E/W - 1``.
        replicate: the ranks holding the *same* experts (expert data parallelism, the other dimension of a 2-D
            mesh), or ``None``.
        dense: every rank holding the non-expert weights (router, shared experts): the group gradients of
            those are reduced over.
        size, rank: ``W`` and this rank's index in ``expert``.
        timeout: seconds any collective may wait.
    """

    def __init__(self, expert, replicate, dense, timeout: float):
        self.expert, self.replicate, self.dense = expert, replicate, dense
        self.size, self.rank = dist.get_world_size(expert), dist.get_rank(expert)
        self.timeout = timeout

    def __deepcopy__(self, memo):
        return self  # process groups are handles to the same communicators, shared by copies

    def __reduce__(self):
        raise TypeError("an expert-parallel layer holds process groups, which cannot be pickled; save its "
                        "weights with moe_ref.checkpoint.save_sharded")

    def comm_device(self) -> torch.device:
        """Where the small integer tensors of the collectives live: the GPU for NCCL, the CPU otherwise."""
        if dist.get_backend(self.expert) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def wait(self, work, what: str) -> None:
        """Wait for an async collective at most ``timeout`` seconds; raise naming it and this rank otherwise."""
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise RuntimeError(f"expert parallelism: {what} failed or timed out after {self.timeout:g} s on rank "
                               f"{dist.get_rank()}; another rank may have died, raised, or not called it "
                               f"({e})") from e

    def all_gather(self, t: torch.Tensor, group, what: str) -> torch.Tensor:
        """``[n, ...]`` from every rank of ``group`` -> ``[size * n, ...]`` (equal ``n`` on every rank)."""
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        self.wait(dist.all_gather(parts, t.contiguous(), group=group, async_op=True), what)
        return torch.cat(parts)

    def all_reduce(self, t: torch.Tensor, group, what: str) -> torch.Tensor:
        """Sum ``t`` over ``group``, in place (and returned)."""
        self.wait(dist.all_reduce(t, group=group, async_op=True), what)
        return t

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], what: str) -> torch.Tensor:
        """``all_to_all_single`` over ``expert``: send ``in_splits[j]`` rows to rank ``j``, receive
        ``out_splits[j]`` rows from it, in rank order. 16-bit floats travel as their bytes (``uint8``, the same
        bits), which every backend carries (gloo has no bfloat16)."""
        x = x.contiguous()
        wire = x.view(torch.uint8) if x.dtype in (torch.bfloat16, torch.float16) else x
        out = wire.new_empty((sum(out_splits), *wire.shape[1:]))
        self.wait(dist.all_to_all_single(out, wire, out_splits, in_splits, group=self.expert, async_op=True), what)
        return out.view(x.dtype)


def resolve_groups(group=None, mesh=None, ep_dim: str = "ep", timeout: float = DEFAULT_TIMEOUT
                   ) -> ExpertParallelGroups:
    """The :class:`ExpertParallelGroups` of a process group or a ``DeviceMesh``.

    Args:
        group: the expert-parallel process group (default: the whole world); the non-expert weights are
            replicated over the same ranks.
        mesh: instead of ``group``, a 1-D ``DeviceMesh`` (expert parallelism over it) or a 2-D one with a
            dimension named ``ep_dim``: experts are spread along ``ep_dim`` and replicated along the other
            dimension (expert data parallelism). The mesh must span every rank.
        ep_dim: the name of the expert-parallel dimension of a 2-D mesh.
        timeout: seconds any collective may wait, ``> 0``.
    """
    timeout = _checks.finite_float("timeout", timeout, minimum=0.0, strict=True)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert parallelism needs an initialised default process group: call "
                         "torch.distributed.init_process_group first (torchrun, or moe_ref.launch.spawn)")
    if group is not None and mesh is not None:
        raise ValueError("give group or mesh, not both")
    if mesh is None:
        expert = dist.group.WORLD if group is None else group
        if not isinstance(expert, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        if dist.get_rank(expert) < 0:
            raise ValueError(f"this rank ({dist.get_rank()}) is not a member of group")
        return ExpertParallelGroups(expert, None, expert, timeout)
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh or None, got {type(mesh).__name__}")
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"mesh must span every rank ({dist.get_world_size()}), got {mesh.size()} ranks")
    if mesh.ndim == 1:
        return ExpertParallelGroups(mesh.get_group(0), None, dist.group.WORLD, timeout)
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or ep_dim not in names:
        raise ValueError(f"mesh must be 1-D, or 2-D with a dimension named ep_dim={ep_dim!r}; got "
                         f"{mesh.ndim}-D with names {names}")
    other = next(name for name in names if name != ep_dim)
    return ExpertParallelGroups(mesh.get_group(ep_dim), mesh.get_group(other), dist.group.WORLD, timeout)


def _fingerprint(*parts) -> int:
    """A 63-bit hash of the reprs of ``parts`` (the same on every rank for the same configuration)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def check_same_everywhere(groups: ExpertParallelGroups, what: str, **fields) -> None:
    """Raise a ``ValueError`` on every rank unless ``fields`` are the same on every rank of the dense group.

    One collective of one integer (a hash of the fields) when they agree; when they do not, every rank gathers
    the fields' reprs to say which differ, and how.
    """
    mine = torch.tensor([_fingerprint(sorted(fields.items()))], dtype=torch.int64, device=groups.comm_device())
    every = groups.all_gather(mine, groups.dense, f"the {what} check").tolist()
    differ = [rank for rank, value in enumerate(every) if value != every[0]]
    if differ:
        reprs = [None] * len(every)
        dist.all_gather_object(reprs, {key: repr(value) for key, value in fields.items()}, group=groups.dense)
        keys = sorted({key for r in reprs for key in r if len({other.get(key) for other in reprs}) > 1})
        detail = "; ".join(f"{key}: " + ", ".join(f"rank {i} {r.get(key, '(not given)')}" for i, r in enumerate(reprs))
                           for key in keys)
        raise ValueError(f"{what} differs across ranks ({detail})")


@dataclass
class DispatchRecord:
    """What one forward of an :class:`ExpertParallelMoE` sent and received (plain ints, no graph).

    Attributes:
        sent: rows this rank sent to each rank, ``[W]`` (its own included).
        received: rows this rank received from each rank, ``[W]``.
        received_per_expert: rows each local expert computed, ``[E / W]``.
    """

    sent: list[int]
    received: list[int]
    received_per_expert: list[int]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: the backward sends the gradients back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, layer, what):
        ctx.layer, ctx.splits, ctx.what = layer, (out_splits, in_splits), what
        return layer._exchange(x, out_splits, in_splits, what)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return ctx.layer._exchange(grad, in_splits, out_splits, ctx.what + "_backward"), None, None, None, None


class ExpertParallelMoE(MoE):
    """:class:`~moe_ref.moe.MoE` with its routed experts spread over ``W`` ranks (see the module docstring).

    Constructed the same way on every rank. With the same random seed on every rank it holds exactly the
    weights the plain :class:`~moe_ref.moe.MoE` would (each rank keeps its slice of the experts, so building
    needs the memory of all the experts once; build on the meta device and load a checkpoint for big layers).
    :meth:`from_moe` shards an existing layer.

    Args:
        d_model, d_hidden, num_experts, k: as :class:`~moe_ref.moe.MoE`; ``num_experts`` divisible by ``W``.
        group, mesh, ep_dim, timeout: the process groups (see :func:`resolve_groups`).
        capacity_scope: ``"rank"`` (default) or ``"global"`` (needs a capacity with ``group="batch"`` and the
            same number of tokens on every rank).
        **options: every other :class:`~moe_ref.moe.MoE` option (``activation``, ``router``, ``capacity``,
            ``shared``, ``residual``, ``aux_losses``, ``backend``, ``init_std``). ``impl`` must be
            ``"grouped"``.

    Attributes:
        ep: the :class:`ExpertParallelGroups`.
        first_expert: the global index of this rank's first expert.
        last_dispatch: the :class:`DispatchRecord` of the last forward.
        timings: when ``record_timings`` is true, seconds accumulated per step (``counts``, ``dispatch``,
            ``experts``, ``combine``, and ``dispatch_backward``, ``combine_backward``); see
            :meth:`reset_timings`.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 2, *, group=None, mesh=None,
                 ep_dim: str = "ep", capacity_scope: str = "rank", timeout: float = DEFAULT_TIMEOUT, **options):
        groups = resolve_groups(group, mesh, ep_dim, timeout)
        # one collective before anything can raise on some ranks only: the ranks agree, or all raise
        check_same_everywhere(groups, "the ExpertParallelMoE configuration", d_model=d_model, d_hidden=d_hidden,
                              num_experts=num_experts, k=k, capacity_scope=capacity_scope,
                              world_size=groups.size, default_dtype=str(torch.get_default_dtype()), **options)
        _checks.positive_int("num_experts", num_experts)
        if num_experts % groups.size:
            raise ValueError(f"num_experts must be divisible by the expert-parallel world size W={groups.size}, "
                             f"got num_experts={num_experts}")
        _checks.choice("capacity_scope", capacity_scope, CAPACITY_SCOPES)
        if options.get("impl", "grouped") != "grouped":
            raise ValueError(f"impl must be 'grouped' for expert parallelism, got {options['impl']!r}")
        self.ep = groups  # before MoE.__init__: _make_experts needs it
        super().__init__(d_model, d_hidden, num_experts, k, **options)
        capacity = self.capacity_config
        if capacity_scope == "global" and (capacity is None or capacity.group != "batch"):
            raise ValueError("capacity_scope='global' needs capacity=CapacityConfig(..., group='batch'); "
                             f"got capacity={capacity}")
        self.capacity_scope = capacity_scope
        self.num_local_experts = num_experts // groups.size
        self.first_expert = groups.rank * self.num_local_experts
        self.last_dispatch: DispatchRecord | None = None
        self.record_timings = False
        self.timings: dict[str, float] = {}
        self._global_drops: tuple[int, int, int] | None = None

    def _make_experts(self, d_model, d_hidden, num_experts, activation, init_std) -> Experts:
        # draw every expert's initial weights, as MoE does, then keep this rank's slice
        local = num_experts // self.ep.size
        full = Experts(d_model, d_hidden, num_experts, activation, init_std)
        return full.narrow(self.ep.rank * local, (self.ep.rank + 1) * local)

    @classmethod
    def from_moe(cls, moe: MoE, *, group=None, mesh=None, ep_dim: str = "ep", capacity_scope: str = "rank",
                 timeout: float = DEFAULT_TIMEOUT) -> "ExpertParallelMoE":
        """The expert-parallel layer holding ``moe``'s weights (every rank passes the same ``moe``)."""
        if not isinstance(moe, MoE) or isinstance(moe, ExpertParallelMoE):
            raise TypeError(f"moe must be a plain MoE, got {type(moe).__name__}")
        with torch.device("meta"):
            layer = cls(moe.d_model, moe.d_hidden, moe.num_experts, moe.k, group=group, mesh=mesh, ep_dim=ep_dim,
                        capacity_scope=capacity_scope, timeout=timeout, **moe_options(moe))
        layer.load_full_state_dict(moe.state_dict(), assign=True)
        layer.train(moe.training)
        return layer

    def load_full_state_dict(self, state: dict, *, assign: bool = False):
        """Load the state dict of a plain :class:`~moe_ref.moe.MoE` (all experts); keep this rank's slice."""
        local = {}
        for name, value in state.items():
            if name in ("experts.w_in", "experts.w_up", "experts.w_out"):
                value = value[self.first_expert:self.first_expert + self.num_local_experts]
            local[name] = value.detach().clone()  # never a view of the caller's tensors
        return self.load_state_dict(local, assign=assign)

    # -- the forward's steps ----------------------------------------------------------------------------------

    def _capacity(self, routing: Routing, shape: torch.Size) -> CapacityRecord | None:
        if self.capacity_config is None or self.capacity_scope == "rank":
            return super()._capacity(routing, shape)
        return self._global_capacity(routing)

    def _global_capacity(self, routing: Routing) -> CapacityRecord:
        """Capacity over the tokens of every rank of the expert group, in one priority order (rank-major)."""
        T, ep, device = routing.num_tokens, self.ep, routing.expert_indices.device
        counts = ep.all_gather(torch.tensor([T], device=ep.comm_device()), ep.expert, "token-count gather").tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"capacity_scope='global' needs the same number of tokens on every rank, got {counts}")
        config, W = self.capacity_config, ep.size
        if T == 0:  # every rank has no tokens (the counts agree): nothing to gather, nothing to drop
            none = torch.zeros_like(routing.expert_indices, dtype=torch.bool)
            return CapacityRecord(0, 0, none, torch.full_like(routing.expert_indices, -1), none)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return ep.all_gather(t.to(ep.comm_device()), ep.expert, "capacity gather").to(device)

        indices = gather(routing.expert_indices)
        mask = None if routing.mask is None else gather(routing.mask.to(torch.uint8)).bool()
        scores = gather(routing.router_scores.detach()) if config.drop_priority == "score" else None
        positions = queue_positions(indices, self.num_experts, group_size=W * T, drop_priority=config.drop_priority,
                                    scores=scores, mask=mask)[ep.rank * T:(ep.rank + 1) * T]
        capacity = config.slots(W * T, self.num_experts, self.k)
        assigned = positions >= 0
        keep = assigned & (positions < capacity)
        return CapacityRecord(capacity=capacity, group_size=W * T, keep=keep,
                              positions=torch.where(keep, positions, -1), dropped=assigned & ~keep)

    def _routed(self, x: torch.Tensor, routing: Routing, capacity: CapacityRecord | None) -> torch.Tensor:
        """Sort, exchange counts, dispatch, experts, combine: ``[T, d_model]`` -> ``[T, d_model]`` float32."""
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            plan = sort_by_expert(routing, capacity)
            send_counts, recv_counts = self._exchange_counts(plan.tokens_per_expert, x.dtype)
            sent, received = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
            x_recv = _AllToAll.apply(permute(x, plan), received, sent, self, "dispatch")  # [R, d] source-major
            # source-major -> expert-major, so each local expert's rows are contiguous for the grouped matmul
            local_expert = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep.size)
            order = torch.argsort(local_expert.repeat_interleave(recv_counts.reshape(-1).to(x.device)), stable=True)
            per_expert = recv_counts.sum(0)
            start = self._clock(x)
            y_local = self.experts(x_recv[order], per_expert.cumsum(0).to(torch.int32).to(x.device),
                                   backend=self.backend, check=False)
            self._lap("experts", start, x)
            y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)  # back to source-major
            y_sorted = _AllToAll.apply(y_recv, sent, received, self, "combine")
            self.last_dispatch = DispatchRecord(sent, received, per_expert.tolist())
            return combine(y_sorted, plan, x.shape[0])

    def _exchange_counts(self, tokens_per_expert: torch.Tensor, dtype: torch.dtype):
        """Send ``[W, E/W]`` row counts (and this rank's input dtype); receive the same from every rank.

        Returns ``(send_counts, recv_counts)``, ``[W, E/W]`` int64 on the CPU: ``recv_counts[s, j]`` rows come
        from rank ``s`` for local expert ``j``. Raises a ``ValueError`` on every rank if the dtypes differ.
        """
        W, E_local = self.ep.size, self.num_local_experts
        code = _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)
        send = torch.cat([tokens_per_expert.view(W, E_local).to(torch.int64),
                          torch.full((W, 1), code, dtype=torch.int64, device=tokens_per_expert.device)], dim=1)
        recv = self._exchange(send.to(self.ep.comm_device()), [1] * W, [1] * W, "counts").cpu()
        codes = recv[:, -1].tolist()
        if len(set(codes)) > 1:
            names = [str(_DTYPES[c]) if c < len(_DTYPES) else "other" for c in codes]
            raise ValueError(f"x must have the same dtype on every rank of the expert group, got {names} "
                             f"(by rank)")
        return send[:, :-1].cpu(), recv[:, :-1]

    def _exchange(self, x: torch.Tensor, out_splits, in_splits, what: str) -> torch.Tensor:
        """One timed all-to-all of the rows of ``x`` (a copy when ``W = 1``)."""
        start = self._clock(x)
        if self.ep.size == 1:
            out = x.clone()
        else:
            out = self.ep.all_to_all(x, list(out_splits), list(in_splits), f"the {what} all-to-all")
        self._lap(what, start, x)
        return out

    def _clock(self, x: torch.Tensor) -> float | None:
        if not self.record_timings:
            return None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def _lap(self, name: str, start: float | None, x: torch.Tensor) -> None:
        if start is not None:
            end = self._clock(x)
            self.timings[name] = self.timings.get(name, 0.0) + end - start

    def reset_timings(self) -> None:
        """Zero :attr:`timings`."""
        self.timings = {}

    # -- statistics and training hooks ------------------------------------------------------------------------

    def _record(self, routing, capacity, losses, aux) -> None:
        super()._record(routing, capacity, losses, aux)
        self._global_drops = None
        if capacity is not None:
            keep, dropped = capacity.keep, capacity.dropped
            lost = dropped.any(dim=1) & ~keep.any(dim=1)
            local = torch.stack([dropped.sum(), keep.sum() + dropped.sum(), lost.sum()]).to(torch.int64)
            total = self.ep.all_reduce(local.to(self.ep.comm_device()), self.ep.dense, "drop-count all-reduce")
            self._global_drops = tuple(total.tolist())

    @property
    def num_dropped(self) -> int | None:
        """(token, expert) pairs dropped in the last forward, summed over every rank (the same on each)."""
        if self.last_routing is None:
            return None
        return 0 if self._global_drops is None else self._global_drops[0]

    @property
    def drop_rate(self) -> float | None:
        """Fraction of all ranks' assignments dropped in the last forward (the same on every rank)."""
        if self.last_routing is None:
            return None
        if self._global_drops is None:
            return 0.0
        dropped, assigned, _ = self._global_drops
        return dropped / assigned if assigned else 0.0

    @property
    def tokens_dropped(self) -> int | None:
        """Tokens of every rank that lost all their assignments in the last forward (the same on each)."""
        if self.last_routing is None:
            return None
        return 0 if self._global_drops is None else self._global_drops[2]

    def after_optimizer_step(self) -> None:
        """The auxiliary-loss-free bias update, with the load counted over every rank (so every rank's bias
        stays the same); a no-op without a bias."""
        if self.router.has_bias:
            self.ep.all_reduce(self.router.load_since_update, self.ep.dense, "load all-reduce")
        super().after_optimizer_step()

    @property
    def max_ranks_per_token(self) -> int:
        """The most ranks one token's rows can go to, ``min(k, W)`` or fewer with node-limited routing."""
        W, router = self.ep.size, self.router_config
        bound = min(self.k, W)
        if router.kind == "sigmoid" and router.n_group > 1:
            if router.n_group % W == 0:  # whole groups on each rank
                bound = min(bound, router.topk_group)
            elif W % router.n_group == 0:  # each group spread over W / n_group ranks
                bound = min(bound, router.topk_group * W // router.n_group)
        return bound

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ep_size={self.ep.size}, ep_rank={self.ep.rank}, "
                f"local_experts={self.first_expert}..{self.first_expert + self.num_local_experts - 1}, "
                f"capacity_scope={self.capacity_scope!r}")


def moe_options(moe: MoE) -> dict:
    """The keyword options that rebuild ``moe`` (everything but the four sizes)."""
    return dict(activation=moe.activation, router=moe.router_config, capacity=moe.capacity_config,
                shared=moe.shared_config, residual=moe.residual_config, aux_losses=moe.loss_config,
                backend=moe.backend, init_std=moe.experts.init_std)


def expert_parallel(model: nn.Module, *, group=None, mesh=None, ep_dim: str = "ep", capacity_scope: str = "rank",
                    timeout: float = DEFAULT_TIMEOUT) -> nn.Module:
    """Replace every plain :class:`~moe_ref.moe.MoE` inside ``model`` by its :class:`ExpertParallelMoE`, in place.

    Build the model the same way (same seed) on every rank first. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, MoE) and not isinstance(module, ExpertParallelMoE)]
    if not targets:
        raise ValueError("model contains no MoE layer to make expert-parallel")
    for name, moe in targets:
        layer = ExpertParallelMoE.from_moe(moe, group=group, mesh=mesh, ep_dim=ep_dim,
                                           capacity_scope=capacity_scope, timeout=timeout)
        if name == "":
            raise ValueError("model is itself an MoE; use ExpertParallelMoE.from_moe(model)")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    return model


@torch.no_grad()
def reduce_gradients(model: nn.Module, *, average: bool = True) -> None:
    """After ``backward``: sum (or average) every gradient over the ranks that hold that parameter.

    The local experts' gradients already add up every rank's tokens (the dispatch's backward brought them
    home); they are reduced only over the ranks that replicate the same experts (``ep.replicate``, if any).
    Every other parameter is reduced over ``ep.dense``. ``average`` divides both by the size of the dense group,
    which makes a step the gradient of the mean of the ranks' losses. A missing gradient counts as zeros.
    """
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    if not layers:
        raise ValueError("model contains no ExpertParallelMoE")
    ep = layers[0].ep
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    scale = 1.0 / dist.get_world_size(ep.dense) if average else 1.0
    dense = [p for p in params if id(p) not in expert_ids]
    experts = [p for p in params if id(p) in expert_ids]
    for members, group, what in ((dense, ep.dense, "dense"), (experts, ep.replicate, "expert")):
        if group is None:
            if scale != 1.0:
                for p in members:
                    p.grad.mul_(scale)
            continue
        for dtype in sorted({p.grad.dtype for p in members}, key=str):
            same = [p for p in members if p.grad.dtype == dtype]
            flat = torch.cat([p.grad.reshape(-1) for p in same])
            ep.all_reduce(flat, group, f"the {what} gradient all-reduce")
            flat.mul_(scale)
            offset = 0
            for p in same:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()


def node_limited(router: RouterConfig | str, groups: int, max_groups: int) -> RouterConfig:
    """DeepSeek-V3's node-limited routing: the sigmoid router with ``groups`` expert groups (one per rank, or
    per node of ranks) of which a token may use ``max_groups``."""
    config = RouterConfig.coerce(router)
    if config.kind != "sigmoid":
        raise ValueError(f"node-limited routing is the group-limited sigmoid router; got kind={config.kind!r}")
    from dataclasses import replace

    return replace(config, n_group=groups, topk_group=max_groups)


def ranks_per_token(routing: Routing, ep_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[T]`` int64: the distinct ranks each token's computed assignments go to (experts split evenly, in order).

    ``mask``: ``[T, slots]`` bool, the pairs computed (default ``routing.mask``, all if ``None``).
    """
    _checks.positive_int("ep_size", ep_size)
    E = routing.num_experts
    if E % ep_size:
        raise ValueError(f"ep_size must divide num_experts={E}, got {ep_size}")
    mask = routing.mask if mask is None else mask
    rank = routing.expert_indices // (E // ep_size)  # [T, slots]
    hit = torch.zeros(routing.num_tokens, ep_size, dtype=torch.bool, device=rank.device)
    chosen = torch.ones_like(rank, dtype=torch.bool) if mask is None else mask
    hit[torch.arange(routing.num_tokens, device=rank.device).unsqueeze(1).expand_as(rank)[chosen], rank[chosen]] = True
    return hit.sum(dim=1)
