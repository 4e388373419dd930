"""``python -m moe_ref.bench decode``: one MoE layer's forward at decode shapes, ``B = 1 .. 64`` tokens.

A decode step of ``B`` sequences feeds each FFN slot ``B`` tokens, ``[B, 1, d_model]``, forward only, no
gradient. For each ``B`` the benchmark times, side by side and interleaved (every repetition times every
candidate once, in an order that rotates), float32 on the CPU:

* ``moe_ref``: :class:`~moe_ref.moe.MoE` built with :func:`~moe_ref.hf.from_hf` from the Mixtral block (the
  same weights), eval mode, default ``impl`` and backend: at these sizes it takes the decode fast path
  (:func:`~moe_ref.dispatch.routed_decode`);
* ``moe_ref_grouped``: the same layer with the fast path off (``decode_max_tokens = 0``): the grouped path
  every call took before the fast path existed, timed in the same run;
* ``hf_eager`` and ``hf_grouped_mm``: ``transformers``' ``MixtralSparseMoeBlock`` with each experts
  implementation; ``hf_best`` in the table is the faster of the two at that ``B`` (the peer on its fastest
  implementation, as :func:`~moe_ref.book.bench.bench_layer` compares them);
* ``dense_active``: a SwiGLU :class:`~moe_ref.ffn.FFN` of width ``k * d_hidden``: the MoE's active FLOPs;
* ``dense_total``: a SwiGLU FFN of width ``E * d_hidden``: the MoE's total expert parameters.

Each timed sample is ``inner`` consecutive calls (a single call of ~0.1 ms is below the timer's
resolution for a fair median); ``tokens_per_s = B / (median seconds per call)``. On a shared machine the
fastest sample (``min_ms``) is the less disturbed estimate of a candidate's own cost; the record keeps both,
and the ratio to the peer on both (``ratio_hf_best``, ``ratio_hf_best_min``).

**Hot or cold weights.** With ``copies=1`` (the default) the inner calls reuse one layer, so the touched
experts' weights may stay in the last-level cache between calls. A model's other layers evict them: with
``copies=L`` every candidate is ``L`` independent copies of its layer (the same weights, in different memory),
and each call runs the input through all of them in turn, as a decode step runs through a model's ``L``
layers; the time reported is per layer. Once the copies' weights exceed the last-level cache, every layer
reads its experts from memory, and the memory floor below is the bound that applies.

Next to the times, the record holds what bounds them from below: the distinct experts the router touched
(``touched``), the bytes of weights a call must read (``touched`` experts' matrices plus the router; the
dense FFNs' whole weights), and ``memory_floor_ms``, those bytes over the measured single-thread read
bandwidth (:func:`read_bandwidth`: a sum over a 256 MiB float32 tensor, far larger than the caches).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .. import _checks
from ..ffn import FFN

#: Candidate names, in table order.
DECODE_CANDIDATES = ("moe_ref", "moe_ref_grouped", "hf_eager", "hf_grouped_mm", "dense_active", "dense_total")
#: The candidates that need ``transformers``.
HF_CANDIDATES = ("hf_eager", "hf_grouped_mm")
#: Default batch sizes (tokens per call).
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def read_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Read bandwidth in GB/s: the best of ``reps`` ``torch.sum`` over a ``mib`` MiB float32 tensor."""
    x = torch.ones(mib * 2 ** 20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def _time(layers: list, x, inner: int) -> float:
    """Seconds per layer call: ``inner`` passes of ``x`` through every layer of ``layers`` in turn."""
    start = time.perf_counter()
    for _ in range(inner):
        for layer in layers:
            layer(x)
    return (time.perf_counter() - start) / (inner * len(layers))


def bench_decode(d_model: int = 512, d_hidden: int = 1024, num_experts: int = 8, k: int = 2, *,
                 batches: tuple[int, ...] = DECODE_BATCHES, reps: int = 15, inner: int = 10, warmup: int = 2,
                 threads: int | None = 1, seed: int = 0, candidates: tuple[str, ...] = DECODE_CANDIDATES,
                 copies: int = 1) -> dict:
    """Forward time per call of the MoE layer and its baselines at ``B`` tokens, for each ``B`` in ``batches``.

    Args:
        d_model, d_hidden, num_experts, k: the MoE's shape (SwiGLU experts, softmax top-``k``, Mixtral's).
        batches: tokens per call.
        reps: timed samples per candidate and ``B`` (interleaved); each is ``inner`` calls.
        inner: calls per sample.
        warmup: untimed samples first.
        threads: ``torch.set_num_threads`` for the run (restored after); ``None`` keeps the current one.
        seed: weights and inputs.
        candidates: a subset of :data:`DECODE_CANDIDATES` (``moe_ref`` is always run). Without the
            ``hf_*`` ones, ``transformers`` is not imported and ``moe_ref`` is a plain seeded
            :class:`~moe_ref.moe.MoE` of the same shape (Mixtral's softmax top-``k`` router, no auxiliary loss).
        copies: layers per candidate, each call running through all of them (``1``: hot weights, the same
            layer every call; more: cold weights, see the module docstring).

    Returns:
        ``{"config", "env", "bandwidth_gbs", "rows"}``: one row per ``B`` with ``touched`` (distinct experts
        hit), ``max_abs_diff`` (``moe_ref`` against ``hf_eager``), and per candidate ``{name: {"ms",
        "tokens_per_s", "bytes", "memory_floor_ms"}}`` under ``"candidates"``; ``hf_best`` names the faster
        ``transformers`` implementation and ``ratio_hf_best`` is its time over ``moe_ref``'s (above 1:
        ``moe_ref`` is faster).
    """
    from ..losses import AuxLossConfig
    from ..moe import MoE
    from .bench import _load_average, environment, rotations

    unknown = set(candidates) - set(DECODE_CANDIDATES)
    if unknown:
        raise ValueError(f"candidates must be among {DECODE_CANDIDATES}, got {sorted(unknown)}")
    names = [n for n in DECODE_CANDIDATES if n in candidates or n == "moe_ref"]
    batches = tuple(_checks.positive_int("batch", b) for b in batches)
    for name, value, minimum in (("reps", reps, 1), ("inner", inner, 1), ("warmup", warmup, 0), ("copies", copies, 1)):
        _checks.positive_int(name, value, minimum=minimum)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(_checks.positive_int("threads", threads))
    try:
        torch.manual_seed(seed)
        modules = {}
        if set(names) & set(HF_CANDIDATES):
            from ..hf import from_hf
            from .bench import _hf_variant, _mixtral_block

            block = _mixtral_block(d_model, d_hidden, num_experts, k).eval()
            modules["moe_ref"] = from_hf(block).eval()
            modules.update({name: _hf_variant(block, name[3:]) for name in HF_CANDIDATES if name in names})
        else:
            modules["moe_ref"] = MoE(d_model, d_hidden, num_experts, k, init_std=0.02,
                                     aux_losses=AuxLossConfig(balance_coef=0.0)).eval()
        if "moe_ref_grouped" in names:
            modules["moe_ref_grouped"] = copy.deepcopy(modules["moe_ref"])
            modules["moe_ref_grouped"].decode_max_tokens = 0
        if "dense_active" in names:
            modules["dense_active"] = FFN(d_model, k * d_hidden).eval()
        if "dense_total" in names:
            modules["dense_total"] = FFN(d_model, num_experts * d_hidden).eval()
        layers = {name: [module] + [copy.deepcopy(module) for _ in range(copies - 1)]
                  for name, module in modules.items()}
        env = environment()
        bandwidth = read_bandwidth()
        expert_bytes = 3 * d_model * d_hidden * 4
        router_bytes = num_experts * d_model * 4
        rows = []
        with torch.no_grad():
            for B in batches:
                x = torch.randn(B, 1, d_model)
                ref = modules["moe_ref"](x)
                other = next((n for n in ("hf_eager", "moe_ref_grouped") if n in names), None)
                diff = None if other is None else float((modules[other](x) - ref).abs().max())
                touched = int((modules["moe_ref"].last_routing.tokens_per_expert > 0).sum())
                for _ in range(warmup):
                    for name in names:
                        _time(layers[name], x, inner)
                times = {name: [] for name in names}
                for _, order in rotations(names, reps):
                    for name in order:
                        times[name].append(_time(layers[name], x, inner))
                nbytes = {"moe_ref": touched * expert_bytes + router_bytes,
                          "moe_ref_grouped": touched * expert_bytes + router_bytes,
                          "hf_eager": touched * expert_bytes + router_bytes,
                          "hf_grouped_mm": num_experts * expert_bytes + router_bytes,  # reads every expert
                          "dense_active": k * expert_bytes, "dense_total": num_experts * expert_bytes}
                cands = {}
                for name in names:
                    ms = statistics.median(times[name]) * 1e3
                    cands[name] = dict(ms=ms, min_ms=min(times[name]) * 1e3, tokens_per_s=B / ms * 1e3,
                                       bytes=nbytes[name], memory_floor_ms=nbytes[name] / bandwidth / 1e6)
                hf = [n for n in HF_CANDIDATES if n in names]
                best = min(hf, key=lambda n: cands[n]["ms"]) if hf else None
                rows.append(dict(batch=B, touched=touched, max_abs_diff=diff, candidates=cands, hf_best=best,
                                 ratio_hf_best=None if best is None else cands[best]["ms"] / cands["moe_ref"]["ms"],
                                 ratio_hf_best_min=None if best is None else
                                 min(cands[n]["min_ms"] for n in hf) / cands["moe_ref"]["min_ms"]))
        env["load_average_after"] = _load_average()
    finally:
        torch.set_num_threads(previous)
    config = dict(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, k=k, batches=list(batches),
                  reps=reps, inner=inner, warmup=warmup, copies=copies, seed=seed, dtype="float32", device="cpu",
                  mode="forward, no grad", candidates=names,
                  compared_with=other)
    return dict(config=config, env=env, bandwidth_gbs=bandwidth, rows=rows)


def format_decode(result: dict) -> str:
    """The table of a :func:`bench_decode` result, as text: tokens/s per candidate and the ratios."""
    c, env = result["config"], result["env"]
    names = c["candidates"]
    lines = [f"MoE layer at decode shapes, forward, float32: d_model={c['d_model']} d_hidden={c['d_hidden']} "
             f"experts={c['num_experts']} k={c['k']}; {c['reps']} samples x {c['inner']} calls, interleaved; "
             + (f"{c['copies']} layer copies (cold weights)" if c.get("copies", 1) > 1 else "one layer (hot weights)"),
             f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}, {env['threads']} "
             f"thread(s), load {env['load_average']} -> {env.get('load_average_after')}, read bandwidth "
             f"{result['bandwidth_gbs']:.1f} GB/s, {env['date']}",
             f"{'B':>3}{'touched':>8}" + "".join(f"{n:>16}" for n in names)
             + f"{'hf_best/moe_ref':>16}{'(min)':>7}{'grouped/moe_ref':>16}{'moe/floor':>10}"
             + "   (tokens/s from median times; ratios of times)"]
    for r in result["rows"]:
        cands = r["candidates"]
        floor = cands["moe_ref"]["ms"] / cands["moe_ref"]["memory_floor_ms"]
        lines.append(f"{r['batch']:>3}{r['touched']:>8}"
                     + "".join(f"{cands[n]['tokens_per_s']:>16.0f}" for n in names)
                     + _ratio(r["ratio_hf_best"]) + _ratio(r.get("ratio_hf_best_min"), 7)
                     + _ratio(cands["moe_ref_grouped"]["ms"] / cands["moe_ref"]["ms"] if "moe_ref_grouped" in cands
                              else None) + f"{floor:>10.1f}")
    return "\n".join(lines)


def _ratio(value, width: int = 16) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def add_arguments(parser) -> None:
    """The ``decode`` subcommand's options."""
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024, help="hidden width of each expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--copies", type=int, default=1,
                        help="layer copies per candidate, run in turn (more than 1: weights come from memory)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", nargs="+", default=list(DECODE_CANDIDATES), choices=DECODE_CANDIDATES)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result, with provenance")


def run(args, argv) -> dict:
    """Run :func:`bench_decode` from parsed ``args``; print the table; write ``--json`` with provenance."""
    import shlex
    import sys

    from ..experiments.results import dumps, provenance

    start = time.perf_counter()
    result = bench_decode(args.d_model, args.d_hidden, args.experts, args.k, batches=tuple(args.batches),
                          reps=args.reps, inner=args.inner, threads=args.threads, seed=args.seed,
                          candidates=tuple(args.candidates), copies=args.copies)
    print(format_decode(result))
    if args.json:
        argv = sys.argv[1:] if argv is None else argv
        command = "python -m moe_ref.bench " + " ".join(shlex.quote(a) for a in argv)
        record = provenance(command, time.perf_counter() - start, "cpu")
        record["threads"] = result["env"]["threads"]  # the run's, not the (restored) caller's
        result = {"schema": 1, "experiment": "decode_bench", "provenance": record, **result}
        with open(args.json, "w") as f:
            f.write(dumps(result))
        print(f"wrote {args.json}")
    return result
