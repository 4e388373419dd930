"""``python -m moe_ref.bench layer``: the CPU targets of one MoE layer, measured side by side in one run.

Three parts, each against its peers on the same weights:

1. **training** (:func:`~moe_ref.book.bench.bench_layer`, ``--runs`` times): forward + backward at the spec
   shape (d=512, d_hidden=1024, E=8, k=2, 2048 tokens, float32) against ``transformers``' Mixtral block and a
   dense SwiGLU FFN of equal active FLOPs. Targets: ``moe_ref`` at most 1.10 times the dense FFN's time, and
   no slower than the faster ``transformers`` implementation.
2. **decode** (:func:`~moe_ref.book.decode_bench.bench_decode`): the forward alone, no gradient, at a few
   tokens per call (``--decode-batches``, default 1, 16, 64), one thread, on ``--decode-copies`` copies of each
   layer run in turn so that the weights come from memory as in a model (cold weights). Target: ahead of
   ``transformers``; reported against the memory floor, the touched experts' weight bytes over the measured
   read bandwidth.
3. **profile** (``--profile``, :mod:`moe_ref.book.layer_profile`): the training step's time by operator group,
   for ``moe_ref`` and the dense FFN.

**The allocator.** PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's default
policy, memory freed at the end of a step may be returned to the operating system and mapped in again, page
by page, on first touch in the next step; how much, and for which candidate, depends on the process's
history. In our interleaved runs one candidate or another paid 2,000 to 3,000 such minor page faults (8 to 11
MiB) per step while the others paid none (the ``page faults`` column): the MoE layer in one process, the
dense FFN in the next. That is a few percent of a step's time that says nothing about either layer's
arithmetic. ``--malloc keep`` (the default) therefore sets glibc's ``M_MMAP_THRESHOLD`` (32 MiB)
and ``M_TRIM_THRESHOLD`` (2 GiB) with ``mallopt`` before timing, so that freed memory is kept for reuse, as
jemalloc or tcmalloc (the allocators PyTorch's CPU tuning guide recommends) do; every candidate runs under the
same setting. ``--malloc system`` leaves glibc's policy alone. The record says which was used.

With ``--json PATH`` the record is written with its provenance (command, commit, versions, CPU, threads,
date, wall time), as the book's results files are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shlex
import sys
import time

from . import decode_bench, layer_profile

#: The targets of issue #13 on the CPU, moe_ref's time over the dense FFN's and over the best transformers'.
DENSE_TARGET, HF_TARGET = 1.10, 1.00
#: The decode candidates the layer command times.
DECODE_CANDIDATES = ("moe_ref", "hf_eager", "hf_grouped_mm", "dense_active")


def add_arguments(parser) -> None:
    """The ``layer`` subcommand's options."""
    from .bench import DEFAULT_CANDIDATES, LAYER_CANDIDATES

    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024, help="hidden width of each expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="independent training runs, each interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), choices=LAYER_CANDIDATES)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16, 64],
                        help="tokens per decode call (none: skip the decode part)")
    parser.add_argument("--decode-copies", type=int, default=4, help="layer copies run in turn (cold weights)")
    parser.add_argument("--decode-reps", type=int, default=10)
    parser.add_argument("--decode-threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also profile the training step by operator group")
    parser.add_argument("--malloc", choices=("keep", "system"), default="keep",
                        help="keep: glibc keeps freed memory for reuse (mallopt); system: glibc's defaults")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the record, with provenance")


def training_targets(result: dict) -> dict:
    """``moe_ref``'s time over the dense FFN's and over the faster ``transformers`` implementation's.

    ``result`` is a :func:`~moe_ref.book.bench.bench_layer` result; a missing candidate gives ``None``.
    Returns ``{"vs_dense", "vs_hf", "best_hf", "dense_met", "hf_met"}`` from the median times (what the
    targets are judged on), and ``vs_dense_min``, ``vs_hf_min`` from the fastest repetitions: on a shared
    machine the least disturbed estimate of each candidate's own cost.
    """
    r = result["results"]
    hf = [name for name in ("hf_eager", "hf_grouped_mm") if name in r]
    best = min(hf, key=lambda name: r[name]["median_ms"]) if hf else None
    vs_dense = 1 / r["dense"]["ratio"] if "dense" in r else None
    vs_hf = 1 / r[best]["ratio"] if best else None
    fastest = r["moe_ref"]["min_ms"] if "min_ms" in r["moe_ref"] else None
    vs_dense_min = fastest / r["dense"]["min_ms"] if fastest and "dense" in r else None
    vs_hf_min = fastest / min(r[name]["min_ms"] for name in hf) if fastest and hf else None
    return dict(vs_dense=vs_dense, vs_hf=vs_hf, best_hf=best,
                dense_met=None if vs_dense is None else vs_dense <= DENSE_TARGET,
                hf_met=None if vs_hf is None else vs_hf <= HF_TARGET,
                vs_dense_min=vs_dense_min, vs_hf_min=vs_hf_min)


def format_targets(targets: dict) -> str:
    """One line per target of :func:`training_targets`."""
    lines = []
    if targets["vs_dense"] is not None:
        lines.append(f"moe_ref / dense FFN: {targets['vs_dense']:.3f} (target <= {DENSE_TARGET:.2f}: "
                     f"{'met' if targets['dense_met'] else 'not met'})" + _fastest(targets.get("vs_dense_min")))
    if targets["vs_hf"] is not None:
        lines.append(f"moe_ref / transformers ({targets['best_hf']}): {targets['vs_hf']:.3f} "
                     f"(target <= {HF_TARGET:.2f}: {'met' if targets['hf_met'] else 'not met'})"
                     + _fastest(targets.get("vs_hf_min")))
    return "\n".join(lines)


def keep_freed_memory() -> str:
    """Make glibc's ``malloc`` keep freed memory for reuse (see the module docstring); for this process, for good.

    Returns:
        What was set, or why nothing was (not glibc, or ``mallopt`` refused).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return f"unchanged: no mallopt in the C library ({name})"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    if mallopt(M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) != 1:
        return "unchanged: mallopt refused the settings"
    return "keep: mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=2 GiB"


def _fastest(ratio) -> str:
    return "" if ratio is None else f"; fastest repetitions: {ratio:.3f}"


def run(args, argv) -> dict:
    """Run the ``layer`` command from parsed ``args``: print its tables; write ``--json`` with provenance."""
    from ..experiments.results import dumps, provenance
    from .bench import bench_layer, format_layer

    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    start = time.perf_counter()
    malloc = keep_freed_memory() if args.malloc == "keep" else "system: glibc's default policy"
    print(f"allocator: {malloc}", flush=True)
    runs = []
    for index in range(args.runs):
        result = bench_layer(args.d_model, args.d_hidden, args.experts, args.k, args.tokens, reps=args.reps,
                             warmup=args.warmup, threads=args.threads, seed=args.seed,
                             candidates=tuple(args.candidates))
        result["targets"] = training_targets(result)
        runs.append(result)
        print(f"--- training, run {index + 1} of {args.runs}\n{format_layer(result)}\n"
              f"{format_targets(result['targets'])}", flush=True)
    decode = None
    if args.decode_batches:
        decode = decode_bench.bench_decode(args.d_model, args.d_hidden, args.experts, args.k,
                                           batches=tuple(args.decode_batches), reps=args.decode_reps,
                                           threads=args.decode_threads, seed=args.seed,
                                           candidates=DECODE_CANDIDATES, copies=args.decode_copies)
        print(f"--- decode\n{decode_bench.format_decode(decode)}", flush=True)
    profile = None
    if args.profile:
        profile = layer_profile.profile_layer(args.d_model, args.d_hidden, args.experts, args.k, args.tokens,
                                              seed=args.seed)
        print(f"--- profile (forward+backward, self time by operator group)\n"
              f"{layer_profile.format_profile(profile)}", flush=True)
    record = dict(schema=1, experiment="layer_bench", malloc=malloc, runs=runs, decode=decode, profile=profile)
    if args.json:
        argv = sys.argv[1:] if argv is None else argv
        command = "python -m moe_ref.bench " + " ".join(shlex.quote(a) for a in argv)
        record = {"schema": 1, "experiment": "layer_bench",
                  "provenance": provenance(command, time.perf_counter() - start, "cpu"), **record}
        with open(args.json, "w") as f:
            f.write(dumps(record))
        print(f"wrote {args.json}")
    return record
