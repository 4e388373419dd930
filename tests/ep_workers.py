"""Worker functions of the expert-parallel tests (``test_expert_parallel.py``, ``test_checkpoint.py``).

They run in processes started by :func:`moe_ref.launch.spawn`, which pickles them by name: they must be
module-level functions of an importable module. The children inherit the parent's ``sys.path`` (the ``spawn``
start method passes it on), and pytest puts ``tests/`` on it, so ``import ep_workers`` works there too; the test
modules also add ``tests/`` themselves, for runs outside pytest.

Each spawn runs *many* checks (starting processes costs seconds) and returns plain numbers, strings and numpy
arrays by case name; the test modules assert on them. A case catches its own exception and returns it as
``{"error": traceback}``, so one failing case does not hide the others.

The reference of every equality case is the single-process :class:`moe_ref.MoE` built with the same seed (so
with the same weights), run inside the worker on every rank's inputs (all ranks draw every rank's inputs from
one seed): the sum of its per-rank backward passes for ``capacity_scope="rank"``, one pass over all ranks'
tokens concatenated (rank-major) for ``"global"``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_ref.capacity import CapacityConfig
from moe_ref.checkpoint import expert_file, load_sharded, save_sharded
from moe_ref.expert_parallel import (ExpertParallelMoE, expert_parallel, node_limited, ranks_per_token,
                                     reduce_gradients)
from moe_ref.losses import AuxLossConfig
from moe_ref.moe import MoE
from moe_ref.routers import RouterConfig
from moe_ref.shared import ResidualConfig, SharedExpertConfig

D_MODEL, D_HIDDEN, EXPERTS, K = 16, 32, 8, 2
TIMEOUT = 30.0  # seconds any collective of a test layer may wait: a broken case fails instead of hanging
DSV3 = RouterConfig(kind="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
NO_AUX = AuxLossConfig(balance_coef=0.0)

# name -> the layer's options, the per-rank input shape, padding or not. Seeds are the position in the list.
EQUALITY_CASES = {
    "softmax_dropless": dict(options=dict(aux_losses=AuxLossConfig(balance_coef=0.01, seq_balance_coef=0.01,
                                                                   z_coef=0.01)),
                             shape=(2, 8), padding=True),
    "sigmoid_dsv3_dropless": dict(options=dict(router=DSV3), k=3, shape=(16,)),
    "capacity_rank_sequence": dict(options=dict(capacity=CapacityConfig(capacity_factor=1.0)), shape=(2, 8),
                                   padding=True),
    "capacity_rank_batch_sigmoid": dict(options=dict(router=DSV3, capacity=CapacityConfig(
        capacity_factor=1.0, group="batch", drop_priority="choice")), shape=(16,)),
    "capacity_global_position": dict(options=dict(capacity=CapacityConfig(capacity_factor=1.0, group="batch"),
                                                  aux_losses=NO_AUX), scope="global", shape=(16,)),
    "capacity_global_choice_padding": dict(options=dict(capacity=CapacityConfig(
        capacity_factor=1.0, group="batch", drop_priority="choice"), aux_losses=NO_AUX), scope="global",
        shape=(2, 8), padding=True),
    "capacity_global_score_sigmoid": dict(options=dict(router=DSV3, capacity=CapacityConfig(
        capacity_factor=1.0, group="batch", drop_priority="score"), aux_losses=NO_AUX), scope="global",
        shape=(16,)),
    "shared_gated": dict(options=dict(shared=SharedExpertConfig(num=2, d_hidden=8, gate=True)), shape=(2, 8),
                         padding=True),
    "shared_capacity_rank": dict(options=dict(shared=SharedExpertConfig(), capacity=CapacityConfig(
        capacity_factor=1.0, group="batch", drop_priority="score")), shape=(16,)),
    "residual": dict(options=dict(residual=ResidualConfig()), shape=(16,)),
}
CAPACITY_CASES = [name for name, spec in EQUALITY_CASES.items() if "capacity" in spec["options"]]


def digest(t: torch.Tensor) -> str:
    """A hash of a tensor's bytes: equal digests mean identical tensors."""
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _inputs(W: int, shape: tuple, padding: bool, seed: int):
    """Every rank's ``(x, upstream gradient, token_mask)``, the same on every rank (one generator)."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(W):
        x = torch.randn(*shape, D_MODEL, generator=g)
        grad = torch.randn(*shape, D_MODEL, generator=g)
        mask = (torch.rand(shape, generator=g) > 0.25) if padding else None
        out.append((x, grad, mask))
    return out


def _group_of(name: str) -> str:
    if name.startswith("experts."):
        return "experts"
    if name.startswith("router."):
        return "router"
    if name.startswith("shared"):
        return "shared"
    return "other"


def _grad_errors(layer: nn.Module, ref: nn.Module, first: int, local: int, prefix: str = "") -> dict:
    """Max |grad - reference grad| per parameter group, and the parameters without a (nonzero) gradient."""
    errors, missing, zero_ref = {}, [], []
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        expected = ref_params[name].grad
        if name.startswith(prefix + "experts."):
            expected = expected[first:first + local]
        if p.grad is None:
            missing.append(name)
            continue
        if expected is None or not bool(expected.any()):
            zero_ref.append(name)
        group = _group_of(name[len(prefix):]) if name.startswith(prefix) else "other"
        errors[group] = max(errors.get(group, 0.0), _max_err(p.grad, expected))
    return dict(grad_errors=errors, missing_grads=missing, zero_ref_grads=zero_ref)


def _drops(capacity) -> tuple[int, int, int]:
    """(dropped pairs, assigned pairs, tokens that lost every assignment) of a CapacityRecord."""
    if capacity is None:
        return 0, 0, 0
    keep, dropped = capacity.keep, capacity.dropped
    lost = dropped.any(dim=1) & ~keep.any(dim=1)
    return int(dropped.sum()), int(keep.sum() + dropped.sum()), int(lost.sum())


def equality_case(rank: int, W: int, name: str, seed: int) -> dict:
    """Output, every gradient and the drop statistics of one case against the single-process reference."""
    spec = EQUALITY_CASES[name]
    k, options, scope = spec.get("k", K), spec["options"], spec.get("scope", "rank")
    data = _inputs(W, spec["shape"], spec.get("padding", False), seed)
    torch.manual_seed(seed)
    layer = ExpertParallelMoE(D_MODEL, D_HIDDEN, EXPERTS, k, capacity_scope=scope, timeout=TIMEOUT, **options)
    torch.manual_seed(seed)
    ref = MoE(D_MODEL, D_HIDDEN, EXPERTS, k, **options)
    first, local = layer.first_expert, layer.num_local_experts
    init_equal = all(torch.equal(getattr(layer.experts, w), getattr(ref.experts, w)[first:first + local])
                     for w in ("w_in", "w_up", "w_out"))
    x, grad, mask = data[rank]
    out = layer(x, mask)
    (out * grad).sum().backward()
    reduce_gradients(layer, average=False)
    result = dict(init_equal=init_equal, first_expert=first, local_experts=local)
    if scope == "rank":
        totals = [0, 0, 0]
        for r, (x_r, grad_r, mask_r) in enumerate(data):
            out_r = ref(x_r, mask_r)
            (out_r * grad_r).sum().backward()
            totals = [a + b for a, b in zip(totals, _drops(ref.last_capacity))]
            if r == rank:
                expected, ref_aux = out_r.detach(), ref.aux_loss
        result["aux_err"] = None if ref_aux is None else _max_err(layer.aux_loss, ref_aux)
    else:
        x_all = torch.cat([d[0] for d in data])
        grad_all = torch.cat([d[1] for d in data])
        mask_all = None if data[0][2] is None else torch.cat([d[2] for d in data])
        out_all = ref(x_all, mask_all)
        (out_all * grad_all).sum().backward()
        n = x.shape[0]
        expected = out_all.detach()[rank * n:(rank + 1) * n]
        totals = list(_drops(ref.last_capacity))
    result.update(out_err=_max_err(out, expected), out_scale=float(expected.abs().max()),
                  **_grad_errors(layer, ref, first, local))
    result.update(num_dropped=layer.num_dropped, drop_rate=layer.drop_rate, tokens_dropped=layer.tokens_dropped,
                  ref_num_dropped=totals[0], ref_drop_rate=totals[0] / totals[1] if totals[1] else 0.0,
                  ref_tokens_dropped=totals[2])
    return result


def bias_case(rank: int, W: int) -> dict:
    """Two training steps of the auxiliary-loss-free bias: the bias after each update, against the plain layer's
    bias updated with the load of every rank's tokens; step 2 routes with the updated bias."""
    config = RouterConfig(kind="sigmoid", bias_update_rate=0.05)
    torch.manual_seed(7)
    layer = ExpertParallelMoE(D_MODEL, D_HIDDEN, EXPERTS, K, router=config, timeout=TIMEOUT)
    torch.manual_seed(7)
    ref = MoE(D_MODEL, D_HIDDEN, EXPERTS, K, router=config)
    steps = []
    for step in range(2):
        data = _inputs(W, (12,), False, 50 + step)
        out = layer(data[rank][0])
        with torch.no_grad():
            for r, (x_r, _, _) in enumerate(data):
                out_r = ref(x_r)
                if r == rank:
                    out_err = _max_err(out, out_r)
        layer.after_optimizer_step()
        ref.after_optimizer_step()
        bias = layer.router.expert_bias
        steps.append(dict(out_err=out_err, bias_digest=digest(bias),
                          bias_equal=torch.equal(bias, ref.router.expert_bias), bias_nonzero=bool(bias.any()),
                          bias=bias.tolist(), load_reset=not bool(layer.router.load_since_update.any())))
    return dict(steps=steps)


def node_limited_case(rank: int, W: int) -> dict:
    """DeepSeek-V3 node-limited routing, E=16, k=4, one expert group per rank: the ranks each token reaches."""
    E, k = 16, 4
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(300 + rank))
    result = {}
    for label, router in (("M1", node_limited("sigmoid", groups=W, max_groups=1)),
                          ("M2", node_limited("sigmoid", groups=W, max_groups=2)), ("unlimited", "sigmoid")):
        torch.manual_seed(11)
        layer = ExpertParallelMoE(D_MODEL, D_HIDDEN, E, k, router=router, timeout=TIMEOUT)
        torch.manual_seed(11)
        ref = MoE(D_MODEL, D_HIDDEN, E, k, router=router)
        out = layer(x)
        reached = ranks_per_token(layer.last_routing, W)
        result[label] = dict(max_ranks=int(reached.max()), min_ranks=int(reached.min()),
                             tokens_over_2=int((reached > 2).sum()), bound=layer.max_ranks_per_token,
                             n_group=layer.router_config.n_group, topk_group=layer.router_config.topk_group,
                             out_err=_max_err(out, ref(x)))
    return result


def mesh_case(rank: int, W: int) -> dict:
    """A 2x2 DeviceMesh ("dp", "ep"): a model with a Linear and an MoE, made expert-parallel over "ep"; after
    ``reduce_gradients(average=True)`` every gradient is the reference's gradient of the mean of the 4 losses."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    options = dict(shared=SharedExpertConfig(gate=True), capacity=CapacityConfig(capacity_factor=1.0))

    def build():
        torch.manual_seed(21)
        return nn.Sequential(nn.Linear(D_MODEL, D_MODEL), MoE(D_MODEL, D_HIDDEN, EXPERTS, K, **options))

    model = expert_parallel(build(), mesh=mesh, timeout=TIMEOUT)
    ref = build()
    layer = model[1]
    data = _inputs(W, (2, 8), False, 60)
    x, grad, _ = data[rank]
    (model(x) * grad).sum().backward()
    reduce_gradients(model, average=True)
    for x_r, grad_r, _ in data:  # each rank's loss with its own auxiliary loss, as the layer computes it
        (ref(x_r) * grad_r).sum().backward()
    for p in ref.parameters():  # the gradient of the mean of the W losses
        p.grad /= W
    errors = _grad_errors(model, ref, layer.first_expert, layer.num_local_experts, prefix="1.")
    return dict(ep_size=layer.ep.size, ep_rank=layer.ep.rank, has_replicate=layer.ep.replicate is not None,
                first_expert=layer.first_expert, expert_grad_digest=digest(torch.cat(
                    [p.grad.reshape(-1) for p in layer.experts.parameters()])), **errors)


def copy_case(rank: int, W: int) -> dict:
    """deepcopy, state_dict and pickle of an ExpertParallelMoE."""
    torch.manual_seed(31)
    layer = ExpertParallelMoE(D_MODEL, D_HIDDEN, EXPERTS, K, shared=SharedExpertConfig(), timeout=TIMEOUT)
    state = layer.state_dict()
    clone = copy.deepcopy(layer)
    x = torch.randn(10, D_MODEL, generator=torch.Generator().manual_seed(rank))
    out, out_clone = layer(x), clone(x)
    result = dict(w_in_shape=tuple(state["experts.w_in"].shape), keys=sorted(state),
                  copy_equal=torch.equal(out, out_clone), copy_shares_groups=clone.ep is layer.ep,
                  copy_has_own_weights=clone.experts.w_in.data_ptr() != layer.experts.w_in.data_ptr())
    try:
        pickle.dumps(layer)
        result["pickle"] = None
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        result["pickle"] = (type(e).__name__, str(e))
    return result


def _expect_error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every rank reports what it got
        return type(e).__name__, str(e)
    return None


def bad_input_cases(rank: int, W: int) -> dict:
    """Bad input on every rank, each of which must raise a ValueError on every rank, without hanging."""

    def make(d_hidden=D_HIDDEN, E=EXPERTS, k=K, **options):
        return ExpertParallelMoE(D_MODEL, d_hidden, E, k, timeout=TIMEOUT, **options)

    def default_dtype():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64 if rank == 1 else torch.float32)
        try:
            make()
        finally:
            torch.set_default_dtype(previous)

    def forward_dtype():
        layer = make()
        dtype = torch.float64 if rank == 1 else torch.float32
        layer.to(dtype)
        layer(torch.randn(6, D_MODEL, dtype=dtype))

    def global_tokens():
        layer = make(capacity=CapacityConfig(capacity_factor=1.0, group="batch"), capacity_scope="global")
        layer(torch.randn(6 + rank, D_MODEL))

    cases = {
        "experts_not_divisible": lambda: make(E=W + W // 2, k=1),
        "d_hidden_differs": lambda: make(d_hidden=D_HIDDEN + 8 * (rank == 1)),
        "k_differs": lambda: make(k=K + (rank == 1)),
        "router_differs": lambda: make(router="sigmoid" if rank == 1 else "softmax"),
        "capacity_differs": lambda: make(capacity=CapacityConfig(capacity_factor=1.0 + (rank == 1))),
        "default_dtype_differs": default_dtype,
        "forward_dtype_differs": forward_dtype,
        "global_capacity_without_batch_group": lambda: make(capacity=CapacityConfig(capacity_factor=1.0),
                                                            capacity_scope="global"),
        "global_capacity_token_counts_differ": global_tokens,
    }
    result = {name: _expect_error(fn) for name, fn in cases.items()}
    # the group must still work after all that
    result["group_still_works"] = _expect_error(lambda: make()(torch.randn(4, D_MODEL)))
    return result


LEAVE_TIMEOUT = 2.0  # seconds: the timeout of the layer whose peer stops answering


def _wait_until_exited(pid: int, seconds: float) -> bool:
    """Wait until process ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def leave_case(rank: int, W: int) -> dict:
    """A rank that stops answering, then leaves. Rank 1 builds the layer, then sleeps past the layer's timeout
    without calling the forward's collectives, then returns: its process ends (spawn's worker puts the result and
    tears its process group down), as after a crash. Rank 0's forward must raise within the timeout each time:
    first while rank 1 is alive but silent, then once its process has exited."""
    pids = [None] * W
    dist.all_gather_object(pids, os.getpid())
    layer = ExpertParallelMoE(D_MODEL, D_HIDDEN, EXPERTS, K, timeout=LEAVE_TIMEOUT)
    if rank != 0:
        time.sleep(LEAVE_TIMEOUT + 3.0)
        return dict(rank=rank, pid=os.getpid())
    result = dict(rank=rank)
    for phase in ("silent", "gone"):
        if phase == "gone":
            result["rank1_exited"] = _wait_until_exited(pids[1], 30.0)
        start = time.monotonic()
        result[phase] = _expect_error(lambda: layer(torch.randn(6, D_MODEL)))
        result[phase + "_seconds"] = time.monotonic() - start
    return result


def ep_suite(rank: int, W: int, checkpoint_jobs: list, leave: bool = False) -> dict:
    """Everything the expert-parallel tests check at world size ``W``, in one spawn: the equality cases, the
    bias, deepcopy/pickle, bad input (W > 1), node-limited routing and the 2-D mesh (W = 4), the checkpoint jobs
    of :func:`checkpoint_jobs_case`, and last, with ``leave``, :func:`leave_case` (which ends rank 1's process)."""
    results: dict[str, object] = {"_seconds": {}}

    def run(name, fn, *args):
        start = time.perf_counter()
        try:
            results[name] = fn(rank, W, *args)
        except Exception:  # noqa: BLE001 - reported per case
            results[name] = {"error": traceback.format_exc()}
        results["_seconds"][name] = time.perf_counter() - start

    for seed, name in enumerate(EQUALITY_CASES):
        run(f"equality/{name}", equality_case, name, seed)
    run("bias", bias_case)
    run("copy", copy_case)
    if W > 1:
        run("bad_input", bad_input_cases)
    if W == 4:
        run("node_limited", node_limited_case)
        run("mesh", mesh_case)
    if checkpoint_jobs:
        run("checkpoint", checkpoint_jobs_case, checkpoint_jobs)
    if leave:
        run("leave", leave_case)
    return results


def exit_at_once(rank: int, W: int) -> None:
    """A worker that dies without a result (as after a signal or the OOM killer)."""
    os._exit(0)


# -- checkpoints -----------------------------------------------------------------------------------------------

CKPT_OPTIONS = dict(router=RouterConfig(kind="sigmoid", n_group=4, topk_group=2), shared=SharedExpertConfig(gate=True))
CKPT_INPUT_SEED = 99


def ckpt_layer(seed: int, W: int | None) -> MoE:
    """The checkpoint tests' layer for ``seed``: plain (``W=None``) or expert-parallel, with a nonzero bias and
    load counts (buffers travel too). Every expert has its own random weights, so a wrong shard shows."""
    with torch.random.fork_rng():  # the caller's random state is left alone (the tests call this in pytest too)
        torch.manual_seed(seed)
        if W is None:
            layer = MoE(D_MODEL, D_HIDDEN, EXPERTS, K, **CKPT_OPTIONS)
        else:
            layer = ExpertParallelMoE(D_MODEL, D_HIDDEN, EXPERTS, K, timeout=TIMEOUT, **CKPT_OPTIONS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.expert_bias.copy_(0.1 * torch.randn(EXPERTS, generator=g))
        layer.router.load_since_update.copy_(torch.randint(0, 50, (EXPERTS,), generator=g))
    return layer.eval()


def ckpt_input() -> torch.Tensor:
    return torch.randn(24, D_MODEL, generator=torch.Generator().manual_seed(CKPT_INPUT_SEED))


@torch.no_grad()
def _ckpt_output(layer: MoE):
    return layer(ckpt_input()).numpy().copy()


def _ckpt_state(layer: MoE) -> dict:
    """What a test compares after a save or load: the output on :func:`ckpt_input`, the router's buffers, and
    the digest of every local tensor (experts by global index)."""
    first = getattr(layer, "first_expert", 0)
    tensors = {}
    for name, t in layer.state_dict().items():
        if name.startswith("experts."):
            tensors.update({f"{name}[{first + j}]": digest(t[j]) for j in range(t.shape[0])})
        else:
            tensors[name] = digest(t)
    return dict(out=_ckpt_output(layer), bias=layer.router.expert_bias.numpy().copy(),
                load=layer.router.load_since_update.numpy().copy(), digests=tensors)


def checkpoint_jobs_case(rank: int, W: int, jobs: list) -> dict:
    """Run checkpoint jobs in order: ``("save", label, directory, seed)`` saves ``ckpt_layer(seed, W)``;
    ``("save_mesh", label, directory, seed)`` saves the same layer sharded over a 2x2 ("dp", "ep") mesh;
    ``("load", label, directory, seed, saver_seed)`` loads into ``ckpt_layer(seed, W)``. Each returns
    :func:`_ckpt_state`; a load also the output before loading (``before``) and the output of
    ``ckpt_layer(saver_seed, W)`` (``expected``: the saver's weights, computed at this world size, so the same
    arithmetic as the loaded layer's)."""
    results = {}
    for kind, label, directory, seed, *saver_seed in jobs:
        try:
            if kind == "save_mesh":
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
                layer = ExpertParallelMoE.from_moe(ckpt_layer(seed, None), mesh=mesh, timeout=TIMEOUT)
                save_sharded(layer, directory)
            elif kind == "save":
                layer = ckpt_layer(seed, W)
                save_sharded(layer, directory)
            elif kind == "load_damaged":  # a copy of the checkpoint with expert shard 1 truncated
                damaged = Path(directory + "_damaged")
                if rank == 0:
                    shutil.copytree(directory, damaged)
                    shard = damaged / expert_file(1, 2)
                    shard.write_bytes(shard.read_bytes()[:200])
                dist.barrier()
                layer = ckpt_layer(seed, W)
                before = _ckpt_state(layer)["digests"]
                error = _expect_error(lambda: load_sharded(layer, str(damaged)))
                results[label] = dict(raised=error, unchanged=_ckpt_state(layer)["digests"] == before)
                continue
            else:
                layer = ckpt_layer(seed, W)
                before = _ckpt_output(layer)
                load_sharded(layer, directory)
            results[label] = _ckpt_state(layer)
            if kind == "load":
                results[label].update(before=before, expected=_ckpt_output(ckpt_layer(saver_seed[0], W)))
        except Exception:  # noqa: BLE001 - reported per job
            results[label] = {"error": traceback.format_exc()}
    return results



# -- the parent's side: every spawn of both test modules, run once per session ---------------------------------

#: The checkpoint jobs of each run, in the order the runs go: a chain 1 -> 2 -> 4 -> 1 of round trips across world
#: sizes (``"1b"`` is the W = 1 run after W = 4), a same-size round trip at W = 2, and a save from a 2x2 mesh.
#: ``(kind, label, directory under the session's root, seed of the layer[, seed of the saver])``; a loader's seed
#: differs from the saver's, so a load that changed nothing would show.
CHECKPOINT_PLAN = {
    1: [("save", "save1", "w1", 101)],
    2: [("load", "1to2", "w1", 201, 101), ("save", "save2", "w2", 102), ("load", "2to2", "w2", 202, 102)],
    4: [("load", "2to4", "w2", 203, 102), ("save", "save4", "w4", 103), ("save_mesh", "save_mesh", "mesh", 104),
        ("load_damaged", "damaged", "w2", 205)],
    "1b": [("load", "4to1", "w4", 204, 103)],
}
SPAWN_TIMEOUT = 60.0  # the process groups' own timeout; spawn waits 60 s more for a rank to answer
_RUNS: dict = {}


def in_process(fn, *args) -> list:
    """``[fn(0, 1, *args)]`` in *this* process with a process group of one rank (gloo), torn down afterwards,
    and the global random state restored. W = 1 needs no second process, and starting one costs seconds."""
    from datetime import timedelta

    from moe_ref.launch import free_port

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in the test process")
    with torch.random.fork_rng():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=timedelta(seconds=SPAWN_TIMEOUT))
        try:
            return [fn(0, 1, *args)]
        finally:
            dist.destroy_process_group()


def checkpoint_suite(rank: int, W: int, jobs: list) -> dict:
    return {"checkpoint": checkpoint_jobs_case(rank, W, jobs)}


def all_runs(tmp_path_factory) -> dict:
    """Every run of both test modules, once per session: ``{W: [results by rank]}`` for W = 1, 2, 4 and
    ``"1b"``, ``"seconds"`` (wall time of each) and ``"root"`` (the checkpoints' directory).

    W = 1 runs in this process (:func:`in_process`); W = 2 and 4 are spawned, one spawn each, and the W = 2 run
    ends with :func:`leave_case`. A spawn that fails is re-raised on every later call.
    """
    from moe_ref.launch import spawn

    if "error" in _RUNS:
        raise _RUNS["error"]
    if "root" not in _RUNS:
        root = tmp_path_factory.mktemp("expert_parallel")
        seconds = {}
        try:
            for W, jobs in CHECKPOINT_PLAN.items():
                jobs = [(job[0], job[1], str(root / job[2]), *job[3:]) for job in jobs]
                start = time.monotonic()
                if W == 1:
                    _RUNS[W] = in_process(ep_suite, jobs)
                elif W == "1b":
                    _RUNS[W] = in_process(checkpoint_suite, jobs)
                else:
                    _RUNS[W] = spawn(ep_suite, W, jobs, W == 2, timeout=SPAWN_TIMEOUT, threads=1)
                seconds[W] = time.monotonic() - start
        except Exception as e:
            _RUNS["error"] = e
            raise
        _RUNS.update(seconds=seconds, root=root)
    return _RUNS
