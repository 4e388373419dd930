"""Expert parallelism (chapter 9): :class:`moe_ref.expert_parallel.ExpertParallelMoE` on gloo processes.

The multi-process checks run once per session, one run per world size (``ep_workers.all_runs``: W = 1 in this
process, W = 2 and W = 4 spawned; starting processes costs seconds, so each run does many checks and returns
plain numbers). The tests below assert on those numbers, one test per case and world size.

The reference is the single-process :class:`moe_ref.MoE` with the same weights (built from the same seed), which
``test_moe.py`` checks against a float64 loop: for ``capacity_scope="rank"``, run on each rank's tokens
separately with the backward passes summed; for ``"global"``, run on every rank's tokens concatenated.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if str(Path(__file__).parent) not in sys.path:  # spawned children inherit sys.path, and import ep_workers
    sys.path.insert(0, str(Path(__file__).parent))

import ep_workers  # noqa: E402
from moe_ref.expert_parallel import ExpertParallelMoE, node_limited, ranks_per_token  # noqa: E402
from moe_ref.launch import WorkerError, spawn  # noqa: E402
from moe_ref.routers import RouterConfig  # noqa: E402
from moe_ref.routing import Routing  # noqa: E402

WORLD_SIZES = (1, 2, 4)
ATOL = 1e-5  # float32 rounding of sums in another order; the measured errors are below 1e-6
E = ep_workers.EXPERTS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return ep_workers.all_runs(tmp_path_factory)


def results_of(runs, W, name) -> list[dict]:
    """Every rank's result of case ``name`` at world size ``W``; fails with the rank's traceback if it raised."""
    per_rank = [r[name] for r in runs[W]]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"{name} at W={W} raised on rank {rank}:\n{result['error']}"
    return per_rank


# -- equality with the single-process layer ---------------------------------------------------------------------

@pytest.mark.parametrize("case", list(ep_workers.EQUALITY_CASES))
@pytest.mark.parametrize("W", WORLD_SIZES)
def test_equality_with_single_process_moe(runs, W, case):
    spec = ep_workers.EQUALITY_CASES[case]
    expected_groups = {"experts", "router"} | ({"shared"} if "shared" in spec["options"] else set()) \
        | ({"other"} if "residual" in spec["options"] else set())
    for rank, r in enumerate(results_of(runs, W, f"equality/{case}")):
        where = f"{case} at W={W}, rank {rank}"
        assert r["init_equal"], f"{where}: the layer's experts are not the plain MoE's slice (same seed)"
        assert (r["first_expert"], r["local_experts"]) == (rank * E // W, E // W), where
        assert r["out_err"] <= ATOL, f"{where}: max |output - reference| = {r['out_err']:.3g}"
        assert r["missing_grads"] == [], f"{where}: parameters without a gradient: {r['missing_grads']}"
        assert r["zero_ref_grads"] == [], f"{where}: reference gradients that are zero: {r['zero_ref_grads']}"
        assert set(r["grad_errors"]) == expected_groups, where
        for group, err in r["grad_errors"].items():
            assert err <= ATOL, f"{where}: max |grad - reference grad| of the {group} parameters = {err:.3g}"
        if r.get("aux_err") is not None:
            assert r["aux_err"] <= ATOL, f"{where}: aux loss differs by {r['aux_err']:.3g}"


@pytest.mark.parametrize("case", list(ep_workers.EQUALITY_CASES))
@pytest.mark.parametrize("W", WORLD_SIZES)
def test_drop_counts_global_and_same_on_every_rank(runs, W, case):
    per_rank = results_of(runs, W, f"equality/{case}")
    seen = {(r["num_dropped"], r["drop_rate"], r["tokens_dropped"]) for r in per_rank}
    assert len(seen) == 1, f"{case} at W={W}: ranks report different drops {seen}"
    r = per_rank[0]
    where = f"{case} at W={W}"
    assert r["num_dropped"] == r["ref_num_dropped"], where
    assert r["tokens_dropped"] == r["ref_tokens_dropped"], where
    assert r["drop_rate"] == pytest.approx(r["ref_drop_rate"], rel=1e-12, abs=0), where
    if case in ep_workers.CAPACITY_CASES:
        assert r["ref_num_dropped"] > 0, f"{where}: nothing was dropped, so the capacity case proves nothing"
    else:
        assert r["num_dropped"] == 0, where


@pytest.mark.parametrize("W", WORLD_SIZES)
def test_loss_free_bias_is_the_same_everywhere_and_uses_every_ranks_load(runs, W):
    per_rank = results_of(runs, W, "bias")
    for step in range(2):
        digests = {r["steps"][step]["bias_digest"] for r in per_rank}
        assert len(digests) == 1, f"W={W} step {step}: the bias differs across ranks"
        for rank, r in enumerate(per_rank):
            s = r["steps"][step]
            where = f"W={W} rank {rank} step {step}"
            assert s["bias_equal"], f"{where}: bias {s['bias']} is not the plain layer's with every rank's load"
            assert s["bias_nonzero"] and s["load_reset"], where
            assert s["out_err"] <= ATOL, f"{where}: output with the updated bias differs by {s['out_err']:.3g}"
    assert per_rank[0]["steps"][0]["bias"] != per_rank[0]["steps"][1]["bias"]


def test_device_mesh_expert_data_parallel(runs):
    per_rank = results_of(runs, 4, "mesh")
    for rank, r in enumerate(per_rank):
        where = f"2x2 mesh, rank {rank}"
        # mesh [[0, 1], [2, 3]] with dims ("dp", "ep"): the ep rank is rank % 2
        assert (r["ep_size"], r["ep_rank"], r["has_replicate"]) == (2, rank % 2, True), where
        assert r["first_expert"] == (rank % 2) * E // 2, where
        assert r["missing_grads"] == [] and r["zero_ref_grads"] == [], where
        assert set(r["grad_errors"]) == {"experts", "router", "shared", "other"}, where
        for group, err in r["grad_errors"].items():
            assert err <= ATOL, f"{where}: {group} gradients differ from the mean of the 4 losses' by {err:.3g}"
    digests = [r["expert_grad_digest"] for r in per_rank]
    assert digests[0] == digests[2] and digests[1] == digests[3], "replicas of the same experts differ"
    assert digests[0] != digests[1]


@pytest.mark.parametrize("M", [1, 2])
def test_node_limited_routing_reaches_at_most_m_ranks(runs, M):
    for rank, r in enumerate(results_of(runs, 4, "node_limited")):
        limited, free = r[f"M{M}"], r["unlimited"]
        where = f"W=4, E=16, k=4, M={M}, rank {rank}"
        assert (limited["n_group"], limited["topk_group"]) == (4, M), where
        assert limited["max_ranks"] <= M, f"{where}: a token reached {limited['max_ranks']} ranks"
        assert limited["bound"] == M, f"{where}: max_ranks_per_token = {limited['bound']}"
        assert limited["out_err"] <= ATOL, where
        assert free["tokens_over_2"] > 0 and free["max_ranks"] > 2, f"{where}: without the limit no token " \
            "reached more than 2 ranks, so the limit is not what keeps them under it"
        assert free["bound"] == 4, where


def test_ranks_per_token_hand_computed():
    # E = 8; W = 4 gives experts {0,1} {2,3} {4,5} {6,7}; W = 2 gives {0..3} {4..7}
    indices = torch.tensor([[0, 1], [0, 4], [3, 7], [6, 2], [5, 4]])
    zeros = torch.zeros(5, 8)
    routing = Routing(indices, torch.full((5, 2), 0.5), zeros, zeros, zeros, torch.zeros(8, dtype=torch.int64))
    assert ranks_per_token(routing, 4).tolist() == [1, 2, 2, 2, 1]
    assert ranks_per_token(routing, 2).tolist() == [1, 2, 2, 2, 1]
    assert ranks_per_token(routing, 8).tolist() == [2, 2, 2, 2, 2]
    assert ranks_per_token(routing, 1).tolist() == [1, 1, 1, 1, 1]
    mask = torch.tensor([[True, True], [True, False], [False, True], [False, False], [True, True]])
    assert ranks_per_token(routing, 4, mask).tolist() == [1, 1, 1, 0, 1]
    with pytest.raises(ValueError, match="ep_size"):
        ranks_per_token(routing, 3)


def test_node_limited_config():
    config = node_limited("sigmoid", groups=4, max_groups=2)
    assert (config.kind, config.n_group, config.topk_group) == ("sigmoid", 4, 2)
    config = node_limited(RouterConfig(kind="sigmoid", routed_scaling_factor=2.5), groups=8, max_groups=4)
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (8, 4, 2.5)
    with pytest.raises(ValueError, match="sigmoid"):
        node_limited("softmax", groups=4, max_groups=2)


# -- copies, pickle -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("W", WORLD_SIZES)
def test_deepcopy_state_dict_and_pickle(runs, W):
    for rank, r in enumerate(results_of(runs, W, "copy")):
        where = f"W={W} rank {rank}"
        assert r["w_in_shape"] == (E // W, ep_workers.D_MODEL, ep_workers.D_HIDDEN), where
        assert r["keys"] == ["experts.w_in", "experts.w_out", "experts.w_up", "router.gate.weight",
                             "shared.w_in.weight", "shared.w_out.weight", "shared.w_up.weight"], where
        assert r["copy_equal"] and r["copy_shares_groups"] and r["copy_has_own_weights"], where
        assert r["pickle"] is not None, f"{where}: pickling the layer did not raise"
        kind, message = r["pickle"]
        assert kind == "TypeError" and "pickle" in message and "save_sharded" in message, (where, message)


# -- bad input ----------------------------------------------------------------------------------------------------

BAD_INPUT = {
    "experts_not_divisible": "divisible",
    "d_hidden_differs": "differs across ranks",
    "k_differs": "differs across ranks",
    "router_differs": "differs across ranks",
    "capacity_differs": "differs across ranks",
    "default_dtype_differs": "differs across ranks",
    "forward_dtype_differs": "same dtype on every rank",
    "global_capacity_without_batch_group": "group='batch'",
    "global_capacity_token_counts_differ": "same number of tokens",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
@pytest.mark.parametrize("W", [2, 4])
def test_bad_input_raises_on_every_rank(runs, W, case):
    per_rank = results_of(runs, W, "bad_input")
    for rank, r in enumerate(per_rank):
        error = r[case]
        assert error is not None, f"{case} at W={W}: rank {rank} did not raise"
        assert error[0] == "ValueError" and BAD_INPUT[case] in error[1], f"{case} at W={W}, rank {rank}: {error}"
    if case == "forward_dtype_differs":
        assert "float64" in per_rank[0][case][1] and "float32" in per_rank[1][case][1]
    if case == "default_dtype_differs":
        assert "float64" in per_rank[1][case][1]


@pytest.mark.parametrize("W", [2, 4])
def test_group_still_works_after_bad_input(runs, W):
    for rank, r in enumerate(results_of(runs, W, "bad_input")):
        assert r["group_still_works"] is None, f"W={W} rank {rank}: {r['group_still_works']}"


def test_process_group_not_initialised():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        ExpertParallelMoE(8, 16, 4, 2)


def test_a_silent_then_dead_rank_makes_the_others_raise_not_hang(runs):
    r = results_of(runs, 2, "leave")[0]
    timeout = ep_workers.LEAVE_TIMEOUT
    assert r["rank1_exited"], "rank 1's process did not exit"
    for phase in ("silent", "gone"):
        error, seconds = r[phase], r[phase + "_seconds"]
        assert error is not None, f"rank 0's forward did not raise with rank 1 {phase}"
        assert error[0] == "RuntimeError" and "failed or timed out" in error[1] and "counts" in error[1], \
            (phase, error)
        assert seconds <= timeout + 3.0, f"rank 1 {phase}: rank 0 raised only after {seconds:.1f} s"
    # rank 1 alive but silent: rank 0 waited the layer's timeout (not the process group's 60 s) and gave up
    assert r["silent_seconds"] >= 0.9 * timeout
    assert runs["seconds"][2] < 60, f"the W=2 run took {runs['seconds'][2]:.0f} s"


def test_spawn_notices_a_worker_that_exits_without_a_result():
    """A rank that dies without reporting (os._exit, a signal, the OOM killer) must make spawn raise promptly,
    not after its timeout + 60 s."""
    outcome = {}

    def call():
        try:
            outcome["value"] = spawn(ep_workers.exit_at_once, 1, timeout=30.0)
        except WorkerError as e:
            outcome["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=15.0)
    assert not thread.is_alive(), (f"spawn still waits {time.monotonic() - start:.0f} s after its only worker "
                                   "exited without a result (it waits timeout + 60 s)")
    assert "error" in outcome, f"spawn returned {outcome.get('value')} for a worker that exited"
