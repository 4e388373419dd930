"""Benchmarks, run as ``python -m moe_ref.bench SUBCOMMAND``.

``layer``: forward + backward time of one MoE layer against ``transformers``' Mixtral block and a dense FFN
with the same active parameters, all in float32 on the same input (:func:`bench_layer`):

* ``moe_ref``: :class:`~moe_ref.moe.MoE`, dropless, ``impl="grouped"``, the default (best available)
  grouped-matmul backend; built with :func:`~moe_ref.hf.from_hf` from the Mixtral block, so the weights
  are identical.
* ``hf_eager`` and ``hf_grouped_mm``: ``MixtralSparseMoeBlock`` with ``config._experts_implementation``
  ``"eager"`` (a Python loop over the experts hit) and ``"grouped_mm"`` (sort and
  ``torch.nn.functional.grouped_mm``); ``transformers`` 5.x reads the setting at every forward.
* ``dense``: :class:`~moe_ref.ffn.FFN` of width ``k * d_hidden``: the same matmul FLOPs per token as the
  ``k`` active experts, without routing.
* ``moe_ref_padded`` (not run by default): the same MoE with ``impl="padded"``, dropless experts on buffers
  padded to the busiest expert, one ``torch.bmm`` per projection instead of one matmul per expert.

Each repetition times every candidate once, in an order that rotates from one repetition to the next, so a
slow spell on a shared machine hits all of them; the table reports medians and ratios to ``moe_ref``.
``gmm`` (grouped-matmul kernels alone) is planned.

Example::

    python -m moe_ref.bench layer --tokens 2048 --reps 20 --json results.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time

import torch

from .ffn import FFN

#: Candidate names of :func:`bench_layer`, in table order.
LAYER_CANDIDATES = ("moe_ref", "hf_eager", "hf_grouped_mm", "dense", "moe_ref_padded")
#: The candidates run by default.
DEFAULT_CANDIDATES = ("moe_ref", "hf_eager", "hf_grouped_mm", "dense")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """Versions, CPU model, thread count, load average and date (UTC) of this run."""
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return dict(torch=torch.__version__, transformers=transformers_version, python=platform.python_version(),
                cpu=_cpu_model(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                load_average=_load_average(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _mixtral_block(d_model: int, d_hidden: int, num_experts: int, k: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d_model, intermediate_size=d_hidden, num_local_experts=num_experts,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():  # transformers leaves the fused expert weights uninitialised
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def _hf_variant(block, implementation: str):
    variant = copy.deepcopy(block)  # its own config, so the two implementations do not share the setting
    variant.experts.config._experts_implementation = implementation
    return variant


def _step(module, x, grad_out) -> torch.Tensor:
    """One forward + backward; returns the output (detached)."""
    x.grad = None
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(grad_out)
    return y.detach()


def bench_layer(d_model: int = 512, d_hidden: int = 1024, num_experts: int = 8, k: int = 2, tokens: int = 2048, *,
                reps: int = 10, warmup: int = 2, threads: int | None = None, seed: int = 0,
                candidates: tuple[str, ...] = DEFAULT_CANDIDATES) -> dict:
    """Time forward + backward of an MoE layer and its baselines, interleaved; float32 on the CPU.

    Args:
        d_model: width of the token vectors.
        d_hidden: hidden width of each expert (the dense FFN gets ``k * d_hidden``).
        num_experts: ``E``.
        k: experts per token.
        tokens: tokens per call, as one sequence ``[1, tokens, d_model]``.
        reps: timed repetitions (each times every candidate once).
        warmup: untimed repetitions first.
        threads: ``torch.set_num_threads`` for the run (restored after); ``None`` keeps the current one.
        seed: ``torch.manual_seed`` for the weights and the input.
        candidates: a subset of :data:`LAYER_CANDIDATES` (default :data:`DEFAULT_CANDIDATES`); ``moe_ref``
            is always included (the ratios' reference). The ``hf_*`` candidates need ``transformers``.

    Returns:
        The measurements, with keys ``config`` (the arguments), ``env`` (:func:`environment`, with the load
        average also taken after the run in ``load_average_after``), ``results`` ``{name: {"median_ms",
        "min_ms", "times_ms", "ratio", "max_abs_diff"}}`` (``ratio`` is the median over ``moe_ref``'s;
        ``max_abs_diff`` compares the output with ``moe_ref``'s, ``None`` for ``dense``, whose function
        differs).
    """
    from .hf import from_hf

    unknown = set(candidates) - set(LAYER_CANDIDATES)
    if unknown:
        raise ValueError(f"candidates must be among {LAYER_CANDIDATES}, got {sorted(unknown)}")
    for name, value in (("reps", reps), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "reps" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'reps' else 0}, got {value!r}")
    names = ["moe_ref", *[c for c in LAYER_CANDIDATES if c in candidates and c != "moe_ref"]]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        block = _mixtral_block(d_model, d_hidden, num_experts, k)
        modules = {"moe_ref": from_hf(block)}
        if "hf_eager" in names:
            modules["hf_eager"] = _hf_variant(block, "eager")
        if "hf_grouped_mm" in names:
            modules["hf_grouped_mm"] = _hf_variant(block, "grouped_mm")
        if "dense" in names:
            modules["dense"] = FFN(d_model, k * d_hidden)
        if "moe_ref_padded" in names:
            modules["moe_ref_padded"] = copy.deepcopy(modules["moe_ref"])
            modules["moe_ref_padded"].impl = "padded"
        x = torch.randn(1, tokens, d_model, requires_grad=True)
        grad_out = torch.randn(1, tokens, d_model)
        env = environment()
        outputs = {}
        for _ in range(warmup):
            for name in names:
                outputs[name] = _step(modules[name], x, grad_out)
        times = {name: [] for name in names}
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:  # rotate who goes first
                start = time.perf_counter()
                outputs[name] = _step(modules[name], x, grad_out)
                times[name].append((time.perf_counter() - start) * 1e3)
        env["load_average_after"] = _load_average()
    finally:
        torch.set_num_threads(previous_threads)
    reference = statistics.median(times["moe_ref"])
    results = {}
    for name in names:
        median = statistics.median(times[name])
        diff = None if name == "dense" else float((outputs[name] - outputs["moe_ref"]).abs().max())
        results[name] = dict(median_ms=median, min_ms=min(times[name]), times_ms=times[name],
                             ratio=median / reference, max_abs_diff=diff)
    config = dict(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, k=k, tokens=tokens, reps=reps,
                  warmup=warmup, seed=seed, dtype="float32", device="cpu", mode="forward+backward")
    return dict(config=config, env=env, results=results)


def format_layer(result: dict) -> str:
    """The table of a :func:`bench_layer` result, as text."""
    c, env = result["config"], result["env"]
    lines = [f"MoE layer, forward+backward, float32: d_model={c['d_model']} d_hidden={c['d_hidden']} "
             f"experts={c['num_experts']} k={c['k']} tokens={c['tokens']}; {c['reps']} reps after "
             f"{c['warmup']} warmup, interleaved",
             f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}, {env['threads']} threads, "
             f"load average {env['load_average']} -> {env.get('load_average_after')}, {env['date']}",
             f"{'candidate':<16}{'median ms':>11}{'min ms':>10}{'x moe_ref':>11}{'max |diff|':>12}"]
    for name, r in result["results"].items():
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"{name:<16}{r['median_ms']:>11.2f}{r['min_ms']:>10.2f}{r['ratio']:>11.3f}{diff:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """The command line: ``python -m moe_ref.bench layer [options]``."""
    parser = argparse.ArgumentParser(prog="python -m moe_ref.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    layer = commands.add_parser("layer", help="MoE layer vs transformers' Mixtral block vs a dense FFN")
    layer.add_argument("--d-model", type=int, default=512)
    layer.add_argument("--d-hidden", type=int, default=1024, help="hidden width of each expert")
    layer.add_argument("--experts", type=int, default=8)
    layer.add_argument("--k", type=int, default=2)
    layer.add_argument("--tokens", type=int, default=2048)
    layer.add_argument("--reps", type=int, default=10)
    layer.add_argument("--warmup", type=int, default=2)
    layer.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    layer.add_argument("--seed", type=int, default=0)
    layer.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), choices=LAYER_CANDIDATES)
    layer.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = bench_layer(args.d_model, args.d_hidden, args.experts, args.k, args.tokens, reps=args.reps,
                         warmup=args.warmup, threads=args.threads, seed=args.seed,
                         candidates=tuple(args.candidates))
    print(format_layer(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
