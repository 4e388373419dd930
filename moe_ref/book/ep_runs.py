"""Chapter 9's live runs: the worker functions its notebook starts on ``W`` processes, and small helpers.

The notebook calls :func:`moe_ref.launch.spawn` with the two workers below, which must live in an importable
module (a spawned process imports them by name):

* :func:`walkthrough` (``W = 2``): one forward and backward of an :class:`~moe_ref.expert_parallel.ExpertParallelMoE`
  made from a plain :class:`~moe_ref.moe.MoE` with :meth:`~moe_ref.expert_parallel.ExpertParallelMoE.from_moe`;
  what each rank sent and received, the largest difference from the plain layer, and a checkpoint written
  with :func:`~moe_ref.checkpoint.save_sharded`.
* :func:`buffers_and_fanout` (``W = 4``): receive-buffer sizes and drops under skewed routing, with and
  without a capacity, and the ranks each token's rows go to with node-limited routing.

The timings come from :func:`moe_ref.book.ep_bench.bench_ep`, the benchmark behind ``python -m moe_ref.bench ep``.

Each worker builds the plain layer from the same seed on every rank, so every rank holds the same weights
before sharding, and draws its tokens from a seed of its own rank. Everything returned is plain Python
(ints, floats, lists) or NumPy arrays: a tensor sent back through ``torch.multiprocessing``'s queue
travels as a handle to shared memory, which is gone once the worker has exited.

The pure helpers (:func:`received_counts`, :func:`cross_rank_rows`, :func:`imbalance`,
:func:`comm_compute_ratio`) are what the notebook's tables and model use; they are
tested on hand-computed cases in ``tests/test_ep_runs.py``.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..capacity import CapacityConfig
from ..checkpoint import save_sharded
from ..counting import dispatch_bytes, ffn_flops
from ..expert_parallel import ExpertParallelMoE, node_limited, ranks_per_token
from ..moe import MoE
from ..routers import RouterConfig


# --- pure helpers -----------------------------------------------------------------------------------------

def received_counts(send_counts: list) -> list:
    """What every rank receives, from what every rank sends.

    Args:
        send_counts: ``[W][W][E/W]`` nested lists, ``send_counts[r][s][j]`` the rows rank ``r`` sends to local
            expert ``j`` of rank ``s``.

    Returns:
        ``[W][W][E/W]``: ``recv[s][r][j]`` the rows rank ``s`` receives from rank ``r`` for its expert ``j``
        (the count exchange is a transpose of the first two axes).
    """
    W = len(send_counts)
    if W == 0 or any(len(row) != W for row in send_counts):
        raise ValueError(f"send_counts must be [W][W][E/W] nested lists, got {send_counts!r}")
    return [[list(send_counts[r][s]) for r in range(W)] for s in range(W)]


def cross_rank_rows(expert_indices: torch.Tensor, num_experts: int, ep_size: int, rank: int,
                    mask: torch.Tensor | None = None) -> tuple[int, int]:
    """Rows rank ``rank`` sends to *other* ranks in a dispatch: one per (token, expert), and one per (token, rank).

    ``moe_ref`` sends one row per (token, expert) pair whose expert lives on another rank. A token with two
    experts on the same remote rank could send its vector there once and let that rank hand it to both
    (DeepSeek-V3 does this per node); the second number counts the rows under that deduplication.

    Args:
        expert_indices: ``[T, k]`` int64, the experts of this rank's tokens.
        num_experts: ``E``; rank ``r`` holds experts ``r * E/W ... (r + 1) * E/W - 1``.
        ep_size: ``W``, dividing ``E``.
        rank: this rank, ``0 <= rank < W``.
        mask: ``[T, k]`` bool, the pairs actually sent (default: all).

    Returns:
        ``(rows, deduplicated_rows)``.
    """
    _checks.positive_int("ep_size", ep_size)
    _checks.positive_int("num_experts", num_experts)
    if num_experts % ep_size:
        raise ValueError(f"ep_size must divide num_experts={num_experts}, got {ep_size}")
    if not 0 <= rank < ep_size:
        raise ValueError(f"rank must be in [0, {ep_size}), got {rank}")
    if expert_indices.dim() != 2:
        raise ValueError(f"expert_indices must be [T, k], got shape {tuple(expert_indices.shape)}")
    dest = expert_indices.cpu() // (num_experts // ep_size)  # [T, k] the rank of each pair's expert
    remote = dest != rank
    if mask is not None:
        remote = remote & mask.cpu().bool()
    hit = torch.zeros(dest.shape[0], ep_size, dtype=torch.bool)
    tokens = torch.arange(dest.shape[0]).unsqueeze(1).expand_as(dest)
    hit[tokens[remote], dest[remote]] = True
    return int(remote.sum()), int(hit.sum())


def imbalance(rows: list) -> float:
    """``max / mean`` of the rows each rank received: 1 when balanced, ``W`` when one rank gets everything."""
    if not rows or min(rows) < 0:
        raise ValueError(f"rows must be a non-empty list of non-negative counts, got {rows!r}")
    mean = sum(rows) / len(rows)
    return max(rows) / mean if mean else 1.0


def comm_compute_ratio(d_model: int, d_hidden: int, k: int, *, flops_per_s: float, bytes_per_s: float,
                       dispatch_bytes_per_element: float = 2, combine_bytes_per_element: float = 2,
                       remote_fraction: float = 1.0, activation: str = "swiglu") -> float:
    """A model, not a measurement: all-to-all time over routed-expert compute time for one MoE layer's forward.

    Per token: dispatch sends ``k`` rows of ``d_model`` elements and combine brings ``k`` back
    (:func:`~moe_ref.counting.dispatch_bytes`, at each direction's element size), over a link of
    ``bytes_per_s`` in each direction; the ``k`` experts cost ``k * ffn_flops(d_model, d_hidden)`` at
    ``flops_per_s``. With balanced routing every rank computes as many rows as its tokens send, so the ratio
    holds per rank whatever the number of tokens; ``d_model`` and ``k`` cancel too, leaving
    ``(b_dispatch + b_combine) * remote_fraction * flops_per_s / (2 * n_mat * d_hidden * bytes_per_s)``
    (``n_mat`` = 3 for gated activations). It assumes both run at their peak rates and nothing overlaps.
    """
    _checks.finite_float("flops_per_s", flops_per_s, minimum=0.0, strict=True)
    _checks.finite_float("bytes_per_s", bytes_per_s, minimum=0.0, strict=True)
    comm = (dispatch_bytes(d_model, k, dispatch_bytes_per_element, remote_fraction=remote_fraction)
            + dispatch_bytes(d_model, k, combine_bytes_per_element, remote_fraction=remote_fraction)) / bytes_per_s
    compute = k * ffn_flops(d_model, d_hidden, activation) / flops_per_s
    return comm / compute


# --- shared by the workers --------------------------------------------------------------------------------

def _tokens(rank: int, tokens: int, d_model: int, seed: int) -> torch.Tensor:
    """``[tokens, d_model]`` float32 inputs of ``rank``, from a seed of its own."""
    return torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(seed + 1000 * (rank + 1)))


def _plain(d_model, d_hidden, num_experts, k, seed, **options) -> MoE:
    torch.manual_seed(seed)  # the same weights on every rank
    return MoE(d_model, d_hidden, num_experts, k, **options)


# --- worker 1: the five steps at W = 2, equality, a checkpoint ---------------------------------------------

def walkthrough(rank: int, world_size: int, d_model: int, d_hidden: int, num_experts: int, k: int, tokens: int,
                seed: int, checkpoint_dir: str | None = None) -> dict:
    """One forward and backward of the expert-parallel layer and of the plain layer on this rank's tokens.

    Returns ``{"rank", "send_counts" ([W][E/W] rows to each rank's experts), "sent", "received",
    "received_per_expert", "output_error", "grad_error" (largest absolute differences from the plain
    layer's output and input gradient), "x", "y" (this rank's tokens and the expert-parallel output, NumPy),
    "experts" (the global indices of this rank's experts)}``; with ``checkpoint_dir``, the layer is saved
    there with :func:`~moe_ref.checkpoint.save_sharded` first.
    """
    moe = _plain(d_model, d_hidden, num_experts, k, seed)
    layer = ExpertParallelMoE.from_moe(moe)
    x = _tokens(rank, tokens, d_model, seed)
    grad = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(seed + rank))
    x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x_ep)
    y.backward(grad)
    y_ref = moe(x_ref)
    y_ref.backward(grad)
    record = layer.last_dispatch
    W, local = layer.ep.size, layer.num_local_experts
    if checkpoint_dir is not None:
        save_sharded(layer, checkpoint_dir)
    return {"rank": rank,
            "experts": list(range(layer.first_expert, layer.first_expert + local)),
            "send_counts": layer.last_routing.tokens_per_expert.view(W, local).tolist(),
            "sent": record.sent, "received": record.received,
            "received_per_expert": record.received_per_expert,
            "output_error": (y - y_ref).abs().max().item(),
            "grad_error": (x_ep.grad - x_ref.grad).abs().max().item(),
            "x": x.numpy(), "y": y.detach().numpy()}


# --- worker 2: W = 4, capacity and node-limited routing -----------------------------------------------------

def buffers_and_fanout(rank: int, world_size: int, capacity: dict, node: dict, seed: int = 0) -> dict:
    """Chapter 9's measurements of where rows go at ``W`` ranks, in one spawn (each spawn costs seconds).

    Args:
        capacity: ``d_model, d_hidden, num_experts, k, tokens, hot_fraction, capacity_factor``. The routing is
            skewed as in :mod:`moe_ref.book.ep_bench`'s ``"skewed"`` scenario: a share ``hot_fraction`` of
            every rank's tokens is moved to where the router prefers experts ``0 .. k-1``, which rank 0 holds.
            One forward each dropless, with a capacity per rank (``capacity_scope="rank"``) and with one over
            all ranks (``"global"``); capacities are counted over the rank's (or all ranks') batch.
        node: ``d_model, d_hidden, num_experts, k, tokens, max_groups`` (a list; ``None`` is unlimited): the
            sigmoid router, node-limited to ``M`` of ``W`` rank groups (:func:`~moe_ref.expert_parallel.node_limited`),
            freshly initialised (untrained), on random tokens.

    Returns:
        A dict with ``"rank"``; ``"capacity"``, per variant: ``"received_per_expert"`` (``[E/W]``),
        ``"received"`` (``[W]``), ``"capacity"`` (``C`` or ``None``), ``"local_dropped"`` (this rank's pairs),
        ``"num_dropped"`` and ``"drop_rate"`` (all ranks'); and ``"node"``, per ``M``: ``"ranks_per_token"``
        (a histogram over ``0 .. W``), ``"remote_rows"`` and ``"dedup_rows"`` (:func:`cross_rank_rows`),
        ``"sent_remote"`` (the layer's own count of rows sent to other ranks) and ``"bound"``
        (``max_ranks_per_token``).
    """
    from .ep_bench import hot_direction

    out: dict = {"rank": rank, "capacity": {}, "node": {}}
    c = capacity
    config = CapacityConfig(capacity_factor=c["capacity_factor"], group="batch")
    for name, cap, scope in [("dropless", None, "rank"), ("per rank", config, "rank"), ("global", config, "global")]:
        moe = _plain(c["d_model"], c["d_hidden"], c["num_experts"], c["k"], seed, capacity=cap)
        x = _tokens(rank, c["tokens"], c["d_model"], seed)
        x[: round(c["hot_fraction"] * c["tokens"])] += hot_direction(moe.router.gate.weight, list(range(c["k"])))
        layer = ExpertParallelMoE.from_moe(moe, capacity_scope=scope)
        with torch.no_grad():
            layer(x)
        record = layer.last_dispatch
        out["capacity"][name] = {
            "received_per_expert": record.received_per_expert, "received": record.received,
            "capacity": None if layer.last_capacity is None else layer.last_capacity.capacity,
            "local_dropped": 0 if layer.last_capacity is None else layer.last_capacity.num_dropped,
            "num_dropped": layer.num_dropped, "drop_rate": layer.drop_rate}
    n = node
    x = _tokens(rank, n["tokens"], n["d_model"], seed)
    for m in n["max_groups"]:
        router = RouterConfig(kind="sigmoid") if m is None else node_limited("sigmoid", world_size, m)
        layer = ExpertParallelMoE.from_moe(_plain(n["d_model"], n["d_hidden"], n["num_experts"], n["k"], seed,
                                                  router=router))
        with torch.no_grad():
            layer(x)
        routing, record = layer.last_routing, layer.last_dispatch
        rows, dedup = cross_rank_rows(routing.expert_indices, n["num_experts"], world_size, rank)
        out["node"][m] = {"ranks_per_token": torch.bincount(ranks_per_token(routing, world_size),
                                                            minlength=world_size + 1).tolist(),
                          "remote_rows": rows, "dedup_rows": dedup,
                          "sent_remote": sum(record.sent) - record.sent[rank],
                          "bound": layer.max_ranks_per_token}
    return out
