"""``python -m moe_ref.bench ep``: where an expert-parallel step spends its time, per rank, at ``W = 1, 2, 4``.

For each world size ``W`` the benchmark starts ``W`` CPU processes with a gloo process group
(:func:`moe_ref.launch.spawn`, one start per ``W``, every scenario inside it). Each builds the same plain
:class:`~moe_ref.moe.MoE` (same seed: SwiGLU experts, softmax top-k router, dropless), shards it with
:meth:`ExpertParallelMoE.from_moe <moe_ref.expert_parallel.ExpertParallelMoE.from_moe>`, and times
forward + backward steps on its own ``[tokens_per_rank, d_model]`` float32 tokens with the layer's
``record_timings`` on. Every rank reports the median over the steps of:

* ``step_ms``: one forward + backward, from a barrier that starts every rank together;
* the all-to-alls: ``counts_ms`` (the ``[W, E/W]`` row counts), ``dispatch_ms``, ``combine_ms`` and their
  backward passes; ``comm_ms`` is their sum (at ``W = 1`` each is a copy of the rows, no communication);
* ``experts_ms``: the local experts' grouped matmuls of the forward;
* ``compute_ms = step_ms - comm_ms``: routing, sorting, experts, combining, the backward's matmuls.

A collective returns on a rank only once every rank has joined it, so the all-to-all time of a fast rank
includes its wait for the slowest: the slowest rank sets the pace, and the wait shows as communication.
``tokens_per_s`` is ``W * tokens_per_rank`` over the slowest rank's median step.

Scenarios:

* ``"balanced"``: random tokens and a random router, so each rank's experts receive about ``1 / W`` of the
  rows (the measured ``imbalance``, max over mean rows received per rank, is a little above 1);
* ``"skewed"``: a fraction ``hot_fraction`` of every rank's tokens is moved (by adding one fixed vector) to
  where the router's logits of experts ``0 .. k-1`` are 10 above the rest, so those tokens all go to rank 0's
  experts (at ``W <= E / k``); rank 0 receives about ``hot_fraction * W + 1 - hot_fraction`` times its share.

On a machine with fewer cores than ``W * threads`` the processes share cores (oversubscription): a step then
also waits for a core, and the time per step grows for that reason too; the result records the number of
cores next to ``W`` so that a reader can tell.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

import torch

from .. import _checks

#: Scenario names of :func:`bench_ep`.
SCENARIOS = ("balanced", "skewed")
#: The timed steps of an :class:`~moe_ref.expert_parallel.ExpertParallelMoE`, by ``layer.timings`` key.
COMM_KEYS = ("counts", "dispatch", "combine", "dispatch_backward", "combine_backward")
#: Logit lead of the hot experts for the skewed scenario's hot tokens.
HOT_LOGIT = 10.0


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def hot_direction(gate_weight: torch.Tensor, hot_experts: list[int], lead: float = HOT_LOGIT) -> torch.Tensor:
    """``[d_model]`` vector ``u`` with ``gate_weight @ u`` = ``lead`` on ``hot_experts`` and 0 on the others
    (least squares, exact when ``d_model >= E``). ``gate_weight``: the router's ``[E, d_model]`` weight."""
    target = torch.zeros(gate_weight.shape[0], 1, dtype=torch.float64)
    target[hot_experts] = lead
    return (torch.linalg.pinv(gate_weight.detach().double()) @ target).squeeze(1).float()


def _tokens(rank: int, scenario: str, layer, tokens_per_rank: int, hot_fraction: float, seed: int):
    """This rank's input ``[T, d_model]`` and output gradient, float32; the same on every call."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + rank)
    x = torch.randn(tokens_per_rank, layer.d_model, generator=g)
    grad_out = torch.randn(tokens_per_rank, layer.d_model, generator=g)
    if scenario == "skewed":
        hot = round(hot_fraction * tokens_per_rank)
        x[:hot] += hot_direction(layer.router.gate.weight, list(range(layer.k)))
    return x.requires_grad_(), grad_out


def _worker(rank: int, world_size: int, settings: dict) -> list[dict]:
    """One rank of :func:`bench_ep`: every scenario at this ``W``; returns one record per scenario."""
    import torch.distributed as dist

    from ..expert_parallel import ExpertParallelMoE
    from ..moe import MoE

    s = settings
    records = []
    for scenario in s["scenarios"]:
        torch.manual_seed(s["seed"])  # the same plain layer on every rank
        moe = MoE(s["d_model"], s["d_hidden"], s["experts"], s["k"], activation="swiglu", router="softmax")
        layer = ExpertParallelMoE.from_moe(moe)
        del moe
        layer.record_timings = True
        x, grad_out = _tokens(rank, scenario, layer, s["tokens_per_rank"], s["hot_fraction"], s["seed"])
        steps, parts = [], {key: [] for key in (*COMM_KEYS, "experts")}
        comm = []
        for rep in range(s["warmup"] + s["reps"]):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer.reset_timings()
            dist.barrier()  # every rank starts the step together
            start = time.perf_counter()
            layer(x).backward(grad_out)
            elapsed = time.perf_counter() - start
            if rep < s["warmup"]:
                continue
            steps.append(elapsed)
            for key in parts:
                parts[key].append(layer.timings.get(key, 0.0))
            comm.append(sum(layer.timings.get(key, 0.0) for key in COMM_KEYS))
        step_ms = statistics.median(steps) * 1e3
        comm_ms = statistics.median(comm) * 1e3
        record = {"rank": rank, "step_ms": step_ms,
                  **{f"{key}_ms": statistics.median(values) * 1e3 for key, values in parts.items()},
                  "comm_ms": comm_ms, "compute_ms": step_ms - comm_ms,
                  "rows_sent": sum(layer.last_dispatch.sent), "rows_received": sum(layer.last_dispatch.received)}
        records.append({"scenario": scenario, "rank": record})
    return records


def bench_ep(world_sizes=(1, 2, 4), *, tokens_per_rank: int = 2048, d_model: int = 256, d_hidden: int = 512,
             experts: int = 8, k: int = 2, reps: int = 5, warmup: int = 2, scenarios=SCENARIOS, seed: int = 0,
             threads: int = 1, hot_fraction: float = 0.5, command: str | None = None) -> dict:
    """Time expert-parallel forward + backward steps per rank at each world size (see the module docstring).

    Args:
        world_sizes: the ``W`` to run, each dividing ``experts``.
        tokens_per_rank: tokens each rank routes per step (float32 ``[tokens_per_rank, d_model]``).
        d_model, d_hidden, experts, k: the layer (SwiGLU experts of width ``d_hidden``, softmax top-``k``).
        reps: timed steps (medians are reported); warmup: untimed steps first.
        scenarios: a subset of :data:`SCENARIOS`, in the order to run.
        seed: the layer's weights (the same on every rank) and, with the rank, each rank's tokens.
        threads: ``torch.set_num_threads`` in each worker process.
        hot_fraction: the skewed scenario's share of tokens sent to rank 0's experts, in ``[0, 1]``.
        command: what to record as the command (default: this call).

    Returns:
        A dict that JSON can write, with ``schema`` (1), ``provenance`` (:func:`moe_ref.experiments.results.provenance`
        plus ``cores``, ``load`` and ``seconds``; ``threads`` is the workers'), ``settings`` (the arguments)
        and ``runs``: one per (W, scenario) with ``world_size``, ``scenario``, ``imbalance`` (max over mean
        rows received per rank), ``tokens_per_s``, ``oversubscription`` (``W * threads / cores``) and
        ``ranks`` (per-rank medians in ms: ``step_ms``, ``counts_ms``, ``dispatch_ms``, ``combine_ms``,
        ``dispatch_backward_ms``, ``combine_backward_ms``, ``experts_ms``, ``comm_ms``, ``compute_ms``, and
        the ``rows_sent`` / ``rows_received`` of a step).
    """
    from ..experiments.results import git_commit, provenance
    from ..launch import spawn
    from .bench import _load_average

    world_sizes = tuple(world_sizes)
    scenarios = tuple(scenarios)
    if not world_sizes:
        raise ValueError("world_sizes must not be empty")
    for name, value in (("tokens_per_rank", tokens_per_rank), ("d_model", d_model), ("d_hidden", d_hidden),
                        ("experts", experts), ("k", k), ("reps", reps), ("threads", threads)):
        _checks.positive_int(name, value)
    _checks.positive_int("warmup", warmup, minimum=0)
    _checks.positive_int("seed", seed, minimum=0)
    if k > experts:
        raise ValueError(f"k must be <= experts={experts}, got {k}")
    for W in world_sizes:
        _checks.positive_int("world_sizes", W)
        if experts % W:
            raise ValueError(f"world_sizes must divide experts={experts}, got {W}")
    if not scenarios:
        raise ValueError("scenarios must not be empty")
    for scenario in scenarios:
        _checks.choice("scenarios", scenario, SCENARIOS)
    hot_fraction = _checks.finite_float("hot_fraction", hot_fraction, minimum=0.0)
    if hot_fraction > 1:
        raise ValueError(f"hot_fraction must be <= 1, got {hot_fraction}")
    settings = dict(world_sizes=list(world_sizes), tokens_per_rank=tokens_per_rank, d_model=d_model,
                    d_hidden=d_hidden, experts=experts, k=k, reps=reps, warmup=warmup, scenarios=list(scenarios),
                    seed=seed, threads=threads, hot_fraction=hot_fraction, activation="swiglu", router="softmax",
                    dtype="float32", device="cpu", backend="gloo", mode="forward+backward")
    if command is None:
        command = (f"moe_ref.book.ep_bench.bench_ep({tuple(world_sizes)}, "
                   + ", ".join(f"{key}={value!r}" for key, value in settings.items()
                               if key in ("tokens_per_rank", "d_model", "d_hidden", "experts", "k", "reps",
                                          "warmup", "seed", "threads", "hot_fraction"))
                   + f", scenarios={scenarios})")
    commit, load_before, start = git_commit(), _load_average(), time.perf_counter()
    runs = []
    for W in world_sizes:
        per_rank = spawn(_worker, W, settings, threads=threads, timeout=600.0)
        for i, scenario in enumerate(scenarios):
            ranks = [per_rank[r][i]["rank"] for r in range(W)]
            received = [r["rows_received"] for r in ranks]
            mean = sum(received) / W
            runs.append({"world_size": W, "scenario": scenario,
                         "imbalance": max(received) / mean if mean else 1.0,
                         "tokens_per_s": W * tokens_per_rank / (max(r["step_ms"] for r in ranks) / 1e3),
                         "oversubscription": W * threads / available_cores(),
                         "ranks": ranks})
    seconds = time.perf_counter() - start
    prov = provenance(command, seconds, "cpu", commit=commit)
    prov.update(threads=threads, cores=available_cores(), load={"before": load_before, "after": _load_average()},
                seconds=round(seconds, 1))
    return {"schema": 1, "provenance": prov, "settings": settings, "runs": runs}


def _span(values, fmt: str = "{:.1f}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}..{fmt.format(high)}"


def format_ep(result: dict) -> str:
    """The tables of a :func:`bench_ep` result, one per scenario, as text (per-rank values as min..max)."""
    s, p = result["settings"], result["provenance"]
    cores = p.get("cores", p.get("cpu_count"))
    lines = [f"expert parallelism on CPU (gloo), forward+backward, float32: tokens/rank={s['tokens_per_rank']} "
             f"d_model={s['d_model']} d_hidden={s['d_hidden']} experts={s['experts']} k={s['k']}; medians of "
             f"{s['reps']} steps after {s['warmup']} warmup",
             f"torch {p['torch']}, {p['cpu']}, {cores} cores (cpu_count {p.get('cpu_count')}), {s['threads']} "
             f"thread(s) per rank, load {p['load']['before']} -> {p['load']['after']}, {p['date']}, "
             f"{p['seconds']:.0f} s"]
    over = sorted({r["world_size"] for r in result["runs"] if r["oversubscription"] > 1})
    if over:
        lines.append(f"note: at W={', '.join(map(str, over))} the {', '.join(map(str, over))} processes share "
                     f"{cores} cores ({s['threads']} thread(s) each): steps also wait for a core")
    header = (f"{'W':>3}{'imbal.':>8}{'tokens/s':>10}{'x W=1':>7}{'step ms':>15}{'comm ms':>15}"
              f"{'compute ms':>15}{'comm %':>11}")
    for scenario in s["scenarios"]:
        runs = [r for r in result["runs"] if r["scenario"] == scenario]
        base = next((r["tokens_per_s"] for r in runs if r["world_size"] == 1), None)
        lines += ["", f"{scenario}: per-rank values min..max (all-to-all time includes waiting for the "
                      f"slowest rank)", header]
        for r in runs:
            ranks = r["ranks"]
            ratio = "-" if base is None else f"{r['tokens_per_s'] / base:.2f}"
            share = [100 * q["comm_ms"] / q["step_ms"] for q in ranks]
            lines.append(f"{r['world_size']:>3}{r['imbalance']:>8.2f}{r['tokens_per_s']:>10.0f}{ratio:>7}"
                         f"{_span([q['step_ms'] for q in ranks]):>15}{_span([q['comm_ms'] for q in ranks]):>15}"
                         f"{_span([q['compute_ms'] for q in ranks]):>15}{_span(share, '{:.0f}'):>11}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The options of ``python -m moe_ref.bench ep`` on an ``argparse`` parser."""
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4], metavar="W")
    parser.add_argument("--tokens-per-rank", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512, help="hidden width of each expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--hot-fraction", type=float, default=0.5,
                        help="skewed scenario: share of tokens routed to rank 0's experts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON")


def run(args, argv: list[str] | None = None) -> dict:
    """Run the benchmark from parsed ``args``; print the table; write ``--json`` if given."""
    from ..experiments.results import dumps

    words = sys.argv[1:] if argv is None else list(argv)
    result = bench_ep(tuple(args.world_sizes), tokens_per_rank=args.tokens_per_rank, d_model=args.d_model,
                      d_hidden=args.d_hidden, experts=args.experts, k=args.k, reps=args.reps, warmup=args.warmup,
                      scenarios=tuple(args.scenarios), seed=args.seed, threads=args.threads,
                      hot_fraction=args.hot_fraction, command=shlex.join(["python", "-m", "moe_ref.bench", *words]))
    print(format_ep(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(dumps(result))
        print(f"wrote {args.json}")
    return result
