"""Chapter 13: pruning and merging routed experts of a trained :class:`~moe_ref.moe.MoE`.

**Pruning** (:func:`prune_experts`) keeps ``keep`` of the ``E`` experts (by default the most used, from
calibration counts, :func:`~moe_ref.quantize.calibration_counts`) and deletes the rest with their router
rows: the result is an ordinary MoE with ``E' = keep`` experts. For the softmax router with renormalised
top-k weights (``norm_topk_prob``, the default for ``k >= 2``) the weights of a token's kept choices are

    ``p_i / sum_{j in top-k'} p_j = exp(l_i) / sum_{j in top-k'} exp(l_j)``,

which does not involve the deleted logits at all: the pruned layer is the original one with the deleted
experts' logits set to ``-inf``. So a token none of whose top-k choices was deleted gets exactly the same
output, and removing experts that no token chooses leaves the layer's function unchanged. (Without
renormalisation the softmax over the ``E'`` remaining logits is larger than over all ``E`` by the factor
``1 / (1 - p_deleted)``.) ``k <= keep`` is required; a grouped sigmoid router (``n_group > 1``) still needs
every group, so it is refused.

**Merging** (:func:`merge_experts`) joins experts into ``E'`` groups, most similar first (agglomerative, by
cosine similarity of the flattened weights), and replaces each group by the usage-weighted average of its
weights. The router keeps all ``E`` rows (:class:`MergedRouter`); the merged expert's logit is the
``logsumexp`` of its members' logits, so its softmax probability is the sum of theirs:

    ``softmax(l')_g = sum_{i in g} exp(l_i) / sum_j exp(l_j) = sum_{i in g} softmax(l)_i``.

A token that chose two members of one group now sends both shares to the merged expert and takes its next
choice as the second. Averaging weights is not averaging outputs (the activation is nonlinear), and experts
trained from independent initialisations have no reason to order their hidden units alike, so weight
averaging of such experts mostly destroys both (chapter 13 measures it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import _checks
from .experts import Experts
from .moe import MoE
from .routers import SigmoidRouter, TopKRouter

_WEIGHTS = ("w_in", "w_up", "w_out")


def _check_moe(moe) -> MoE:
    if not isinstance(moe, MoE):
        raise TypeError(f"moe must be an MoE layer, got {type(moe).__name__}")
    if type(moe.experts) is not Experts:
        raise ValueError(f"moe's experts must be plain float Experts to prune or merge, got "
                         f"{type(moe.experts).__name__} (prune or merge first, then quantize)")
    if isinstance(moe.router, SigmoidRouter) and moe.router.n_group > 1:
        raise ValueError(f"moe's router routes by groups (n_group={moe.router.n_group}) and needs every expert "
                         "of every group; pruning or merging experts of a grouped router is not supported")
    return moe


def _check_counts(counts, num_experts: int) -> torch.Tensor | None:
    if counts is None:
        return None
    counts = torch.as_tensor(counts)
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must have shape [{num_experts}], got {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    return counts


def keep_most_used(counts, keep: int) -> list[int]:
    """The ``keep`` experts with the largest ``counts`` ``[E]`` (ties: the lower id), in increasing id order."""
    counts = torch.as_tensor(counts)
    _checks.positive_int("keep", keep)
    if keep > counts.numel():
        raise ValueError(f"keep must be <= num_experts={counts.numel()}, got {keep}")
    order = sorted(range(counts.numel()), key=lambda e: (-float(counts[e]), e))
    return sorted(order[:keep])


def _check_keep(keep, moe: MoE, counts) -> list[int]:
    E, k = moe.num_experts, moe.k
    if isinstance(keep, bool):
        raise TypeError("keep must be an int or a list of expert ids, got a bool")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (pruning every expert leaves no layer), got {keep}")
        if keep < k:
            raise ValueError(f"keep must be >= k={k} (the router picks k experts per token), got {keep}")
        if keep > E:
            raise ValueError(f"keep must be <= num_experts={E}, got {keep}")
        if counts is None:
            raise ValueError("counts (tokens per expert, from calibration) are needed to choose which experts "
                             "to keep; or pass keep as a list of expert ids")
        return keep_most_used(counts, keep)
    ids = [int(e) for e in keep]
    if len(set(ids)) != len(ids) or any(e < 0 or e >= E for e in ids):
        raise ValueError(f"keep must list distinct expert ids in 0 .. {E - 1}, got {list(keep)}")
    if not ids:
        raise ValueError("keep must keep at least one expert (pruning every expert leaves no layer)")
    if len(ids) < k:
        raise ValueError(f"keep must keep at least k={k} experts (the router picks k per token), got {len(ids)}")
    return sorted(ids)


def _slice_router(router: nn.Module, ids: torch.Tensor) -> None:
    """Keep the router rows (gate, noise projection, bias and its counts) of experts ``ids``, in place."""
    E = len(ids)
    gate = nn.Linear(router.d_model, E, bias=False)
    gate.weight = nn.Parameter(router.gate.weight.detach()[ids].clone())
    router.gate = gate
    if getattr(router, "w_noise", None) is not None:
        router.w_noise = nn.Parameter(router.w_noise.detach()[ids].clone())
    if router.has_bias:
        router.expert_bias = router.expert_bias[ids].clone()
        router.load_since_update = router.load_since_update[ids].clone()
    router.num_experts = E


def _experts_like(experts: Experts, weights: dict) -> Experts:
    """An :class:`Experts` with the same settings holding ``weights`` (``{name: [E', ...]}``)."""
    E = weights["w_in"].shape[0]
    with torch.device("meta"):
        out = Experts(experts.d_model, experts.d_hidden, E, experts.activation, experts.init_std)
    for name in _WEIGHTS:
        w = weights.get(name)
        setattr(out, name, None if w is None else nn.Parameter(w.clone()))
    return out.to(experts.w_in.device)


def prune_experts(moe: MoE, keep, counts=None) -> MoE:
    """A copy of ``moe`` holding only some of its routed experts, with their router rows.

    Args:
        moe: the layer (not modified).
        keep: how many experts to keep (the most used by ``counts``), or the list of expert ids to keep.
            At least ``k`` of them (``ValueError`` otherwise, and for ``0``).
        counts: ``[E]`` tokens per expert (from calibration), needed when ``keep`` is a number.

    Returns:
        An :class:`~moe_ref.moe.MoE` with ``num_experts = keep``; kept expert ``j`` is old expert ``ids[j]``
        (``ids`` in increasing order, stored as the buffer-free attribute ``kept_ids``). Shared experts and
        dense paths are kept whole.
    """
    _check_moe(moe)
    counts = _check_counts(counts, moe.num_experts)
    ids = _check_keep(keep, moe, counts)
    index = torch.tensor(ids, dtype=torch.long, device=moe.experts.w_in.device)
    out = copy.deepcopy(moe)
    weights = {n: None if getattr(moe.experts, n) is None else getattr(moe.experts, n).detach()[index]
               for n in _WEIGHTS}
    out.experts = _experts_like(moe.experts, weights)
    _slice_router(out.router, index)
    out.num_experts = len(ids)
    out.kept_ids = list(ids)
    out.last_routing = out.last_capacity = None
    return out


def expert_similarity(experts: Experts) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the experts' flattened weights (``w_in``, ``w_up``, ``w_out``
    concatenated), float32."""
    flat = torch.cat([getattr(experts, n).detach().reshape(experts.num_experts, -1).float()
                      for n in _WEIGHTS if getattr(experts, n) is not None], dim=1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat @ flat.T


def merge_groups(similarity: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Agglomerative grouping (average linkage) of ``E`` experts into ``num_groups``: repeatedly join the
    two groups whose members' mean pairwise ``similarity`` ``[E, E]`` is the highest. Returns the groups,
    each sorted, ordered by their smallest id."""
    E = similarity.shape[0]
    _checks.positive_int("num_groups", num_groups)
    if num_groups > E:
        raise ValueError(f"num_groups must be <= num_experts={E}, got {num_groups}")
    groups = [[e] for e in range(E)]
    while len(groups) > num_groups:
        best, pair = -float("inf"), None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = similarity[groups[a]][:, groups[b]].mean().item()
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


class MergedRouter(TopKRouter):
    """Softmax top-k over merged experts: keeps the ``E`` original gate rows and a map ``group`` ``[E]`` of
    each row to its merged expert; the logit of merged expert ``g`` is ``logsumexp`` of its rows' logits.

    ``num_experts`` is the number of merged experts ``E'``; the gate has ``E`` rows.
    """

    def __init__(self, router: TopKRouter, groups: list[list[int]]):
        nn.Module.__init__(self)
        self.d_model, self.k = router.d_model, router.k
        self.jitter_noise, self.norm_topk_prob = router.jitter_noise, router.norm_topk_prob
        self.num_experts = len(groups)
        self.gate = copy.deepcopy(router.gate)
        group = torch.empty(router.num_experts, dtype=torch.long)
        for g, members in enumerate(groups):
            group[members] = g
        self.register_buffer("group", group.to(router.gate.weight.device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, E']``: ``logsumexp`` of the logits of each merged expert's rows."""
        rows = super().logits(x)  # [T, E]
        out = rows.new_full((rows.shape[0], self.num_experts), -float("inf"))
        index = self.group.unsqueeze(0).expand_as(rows)
        # logsumexp per group, stably: subtract the row maximum first
        m = rows.amax(dim=1, keepdim=True)
        sums = torch.zeros_like(out).scatter_add(1, index, (rows - m).exp())
        return torch.where(sums > 0, sums.log() + m, out)

    def flops_per_token(self) -> int:
        return 2 * self.d_model * self.gate.weight.shape[0]


def merge_experts(moe: MoE, num_experts: int, counts=None, groups: list[list[int]] | None = None) -> MoE:
    """A copy of ``moe`` with its routed experts merged into ``num_experts`` (see the module docstring).

    Args:
        moe: a layer with the softmax token-choice router (not modified).
        num_experts: ``E'``, at least ``k``.
        counts: ``[E]`` tokens per expert: the weights of the averages (default: plain averages).
        groups: the groups to merge (a partition of ``0 .. E-1`` into ``num_experts`` lists); default
            :func:`merge_groups` on :func:`expert_similarity`.

    Returns:
        An :class:`~moe_ref.moe.MoE` with ``num_experts`` experts and a :class:`MergedRouter`;
        ``merged_groups`` holds the groups.
    """
    _check_moe(moe)
    if type(moe.router) is not TopKRouter or moe.router.has_bias:
        raise ValueError(f"merging needs a plain softmax top-k router, got {type(moe.router).__name__}")
    _checks.positive_int("num_experts", num_experts)
    if num_experts < moe.k:
        raise ValueError(f"num_experts must be >= k={moe.k}, got {num_experts}")
    if num_experts > moe.num_experts:
        raise ValueError(f"num_experts must be <= {moe.num_experts}, got {num_experts}")
    counts = _check_counts(counts, moe.num_experts)
    if groups is None:
        groups = merge_groups(expert_similarity(moe.experts), num_experts)
    members = sorted(e for g in groups for e in g)
    if len(groups) != num_experts or members != list(range(moe.num_experts)) or any(not g for g in groups):
        raise ValueError(f"groups must partition 0 .. {moe.num_experts - 1} into {num_experts} non-empty lists")
    weight = torch.ones(moe.num_experts) if counts is None else counts.double() + 1e-9  # +eps: unused groups
    merged = {}
    for name in _WEIGHTS:
        w = getattr(moe.experts, name)
        if w is None:
            merged[name] = None
            continue
        w = w.detach()
        rows = []
        for g in groups:
            c = (weight[g] / weight[g].sum()).to(w.dtype).to(w.device)
            rows.append(torch.einsum("g,g...->...", c, w[g]))
        merged[name] = torch.stack(rows)
    out = copy.deepcopy(moe)
    out.experts = _experts_like(moe.experts, merged)
    out.router = MergedRouter(moe.router, groups)
    out.num_experts = num_experts
    out.merged_groups = [list(g) for g in groups]
    out.last_routing = out.last_capacity = None
    return out


def _apply(model: nn.Module, fn) -> nn.Module:
    out = copy.deepcopy(model)
    layers = [(parent, name, child) for parent in out.modules() for name, child in parent.named_children()
              if isinstance(child, MoE)]
    if not layers:
        raise ValueError("model holds no MoE layer")
    for i, (parent, name, child) in enumerate(layers):
        setattr(parent, name, fn(i, child))
    return out


def prune_model(model: nn.Module, keep, counts=None) -> nn.Module:
    """A copy of ``model`` with every MoE layer pruned (:func:`prune_experts`); ``counts``: ``[layers, E]``."""
    return _apply(model, lambda i, m: prune_experts(m, keep, None if counts is None else counts[i]))


def merge_model(model: nn.Module, num_experts: int, counts=None) -> nn.Module:
    """A copy of ``model`` with every MoE layer merged (:func:`merge_experts`); ``counts``: ``[layers, E]``."""
    return _apply(model, lambda i, m: merge_experts(m, num_experts, None if counts is None else counts[i]))


__all__ = ["keep_most_used", "prune_experts", "expert_similarity", "merge_groups", "MergedRouter",
           "merge_experts", "prune_model", "merge_model"]
