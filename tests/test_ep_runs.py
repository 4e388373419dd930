"""Chapter 9's helpers (:mod:`moe_ref.book.ep_runs`): hand-computed cases and independent loops.

The workers themselves run multi-process; one small spawned run checks the walkthrough's bookkeeping (what
was sent is what was received, and the outputs equal the plain layer's)."""

import itertools
import math

import pytest
import torch

from moe_ref.book import ep_runs


def test_received_counts_is_the_transpose_of_what_is_sent():
    # W = 2, E/W = 2: rank 0 sends [1, 2] to its own experts and [3, 4] to rank 1's; rank 1 [5, 6] and [7, 8]
    send = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert ep_runs.received_counts(send) == [[[1, 2], [5, 6]], [[3, 4], [7, 8]]]
    # W = 3, E/W = 1: recv[s][r] == send[r][s] for every pair, by a loop written apart
    send3 = [[[r * 10 + s] for s in range(3)] for r in range(3)]
    recv3 = ep_runs.received_counts(send3)
    for r, s in itertools.product(range(3), range(3)):
        assert recv3[s][r] == [r * 10 + s]
    with pytest.raises(ValueError):
        ep_runs.received_counts([[[1], [2]], [[3]]])  # rank 1 lists one destination of two


def test_cross_rank_rows_hand_computed():
    # E = 8, W = 4: experts 2r and 2r + 1 live on rank r. Rank 1's tokens:
    idx = torch.tensor([[2, 3],   # both on rank 1 (itself): no remote row
                        [0, 1],   # both on rank 0: 2 rows, 1 deduplicated
                        [0, 7],   # ranks 0 and 3: 2 rows, 2 deduplicated
                        [4, 3]])  # rank 2 and itself: 1 row, 1 deduplicated
    assert ep_runs.cross_rank_rows(idx, 8, 4, rank=1) == (5, 4)
    # seen from rank 0 instead: token 1 is local, the others are remote
    assert ep_runs.cross_rank_rows(idx, 8, 4, rank=0) == (2 + 0 + 1 + 2, 1 + 0 + 1 + 2)
    # a mask removes dropped pairs: only token 2's expert 7 and token 3's expert 4 are still sent
    mask = torch.tensor([[True, True], [False, False], [False, True], [True, True]])
    assert ep_runs.cross_rank_rows(idx, 8, 4, rank=1, mask=mask) == (2, 2)
    for bad in [dict(num_experts=6, ep_size=4, rank=0), dict(num_experts=8, ep_size=4, rank=4)]:
        with pytest.raises(ValueError):
            ep_runs.cross_rank_rows(idx, **bad)


def test_cross_rank_rows_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    E, W, T, k = 16, 4, 200, 4
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    for rank in range(W):
        rows = dedup = 0
        for t in range(T):
            remote = [int(e) // (E // W) for e in idx[t] if int(e) // (E // W) != rank]
            rows += len(remote)
            dedup += len(set(remote))
        assert ep_runs.cross_rank_rows(idx, E, W, rank) == (rows, dedup)


def test_imbalance():
    assert ep_runs.imbalance([10, 10, 10, 10]) == 1.0
    assert ep_runs.imbalance([40, 0, 0, 0]) == 4.0  # one rank gets everything: W
    assert ep_runs.imbalance([3, 1]) == 1.5
    assert ep_runs.imbalance([0, 0]) == 1.0
    with pytest.raises(ValueError):
        ep_runs.imbalance([])


def test_comm_compute_ratio_closed_form():
    """k and d_model cancel: ratio = (b_dispatch + b_combine) * f * F / (6 * h * B) for a gated FFN."""
    F, B = 989e12, 50e9
    for d, h, k in [(4096, 14336, 2), (7168, 2048, 8), (64, 128, 1)]:
        expected = 2 * 2 * 1.0 * F / (6 * h * B)
        assert ep_runs.comm_compute_ratio(d, h, k, flops_per_s=F, bytes_per_s=B) == pytest.approx(expected)
    # Mixtral's experts over InfiniBand, by hand: 2 * 4096 * 2 bytes each way per row, 6 * 4096 * 14336 FLOPs
    comm = 2 * (2 * 4096 * 2) / 50e9
    compute = 2 * 6 * 4096 * 14336 / 989e12
    assert ep_runs.comm_compute_ratio(4096, 14336, 2, flops_per_s=F, bytes_per_s=B) == pytest.approx(comm / compute)
    # FP8 dispatch (1 byte) and bf16 combine: 3/4 of the bf16 ratio; half the rows remote: half of it again
    base = ep_runs.comm_compute_ratio(7168, 2048, 8, flops_per_s=F, bytes_per_s=B)
    fp8 = ep_runs.comm_compute_ratio(7168, 2048, 8, flops_per_s=F, bytes_per_s=B, dispatch_bytes_per_element=1,
                                     remote_fraction=0.5)
    assert fp8 == pytest.approx(base * 0.75 * 0.5)
    # a non-gated FFN has 2 matrices instead of 3: the ratio is 3/2 as large
    relu = ep_runs.comm_compute_ratio(7168, 2048, 8, flops_per_s=F, bytes_per_s=B, activation="relu")
    assert relu == pytest.approx(base * 1.5)
    assert math.isclose(ep_runs.comm_compute_ratio(4096, 14336, 2, flops_per_s=F, bytes_per_s=B),
                        4 * F / (6 * 14336 * B))
    with pytest.raises(ValueError):
        ep_runs.comm_compute_ratio(4096, 14336, 2, flops_per_s=0, bytes_per_s=B)


def test_walkthrough_spawned(tmp_path):
    """Two ranks: every row sent is received, the counts agree, outputs equal the plain layer, a checkpoint."""
    from moe_ref.launch import spawn

    out = spawn(ep_runs.walkthrough, 2, 16, 32, 4, 2, 8, 0, str(tmp_path), timeout=60.0)
    send = [r["send_counts"] for r in out]
    recv = ep_runs.received_counts(send)
    for s, r in enumerate(out):
        assert r["rank"] == s and r["experts"] == [2 * s, 2 * s + 1]
        assert r["sent"] == [sum(row) for row in send[s]]
        assert r["received"] == [sum(row) for row in recv[s]]
        assert r["received_per_expert"] == [sum(col) for col in zip(*recv[s])]
        assert sum(r["sent"]) == 8 * 2  # dropless: T * k rows leave every rank
        assert r["output_error"] < 1e-6 and r["grad_error"] < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dense.safetensors", "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors",
        "model.safetensors.index.json"]


def test_buffers_and_fanout_spawned():
    """Two ranks, skewed routing: capacity bounds the buffers, drops agree across ranks, node limits hold."""
    from moe_ref.launch import spawn

    cap = dict(d_model=16, d_hidden=16, num_experts=4, k=2, tokens=64, hot_fraction=0.5, capacity_factor=1.0)
    node = dict(d_model=16, d_hidden=8, num_experts=8, k=4, tokens=64, max_groups=[1, None])
    out = spawn(ep_runs.buffers_and_fanout, 2, cap, node, timeout=60.0)
    C = 32  # ceil(1.0 * 64 * 2 / 4), per rank
    for r in out:
        assert r["capacity"]["dropless"]["num_dropped"] == 0
        assert r["capacity"]["per rank"]["capacity"] == C and r["capacity"]["global"]["capacity"] == 2 * C
        for variant in ("per rank", "global"):
            assert max(r["capacity"][variant]["received_per_expert"]) <= 2 * C
    # the hot experts 0 and 1 (rank 0) overflow: something is dropped, and every rank reports the same total,
    # the sum of what each rank dropped from its own tokens
    for variant in ("per rank", "global"):
        totals = {r["capacity"][variant]["num_dropped"] for r in out}
        assert len(totals) == 1 and totals.pop() == sum(r["capacity"][variant]["local_dropped"] for r in out) > 0
    # dropless, rank 0 receives more than its share: each rank's hot half sends both rows to rank 0
    received = [sum(r["capacity"]["dropless"]["received"]) for r in out]
    assert received[0] > received[1] and sum(received) == 2 * 64 * 2
    for r in out:
        limited, free = r["node"][1], r["node"][None]
        assert limited["bound"] == 1 and free["bound"] == 2
        assert limited["ranks_per_token"][2] == 0 and sum(limited["ranks_per_token"]) == 64
        for q in (limited, free):
            assert q["sent_remote"] == q["remote_rows"] >= q["dedup_rows"]
        # with M = 1 a token's 4 rows all go to one rank: a remote token sends 4 rows, or 1 deduplicated
        assert limited["remote_rows"] == 4 * limited["dedup_rows"]
