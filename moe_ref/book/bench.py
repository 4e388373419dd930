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
slow spell on a shared machine hits all of them; the table reports medians and ratios to ``moe_ref``. The
command also times decode shapes (forward only, a few tokens, weights from memory) and, with ``--profile``,
splits the training step's time by operator group, and prints the CPU targets with each
(:mod:`moe_ref.book.layer_bench`).
``decode``: one layer's forward at decode shapes, ``B = 1 .. 64`` tokens, against the same peers and two dense
FFNs (:mod:`moe_ref.book.decode_bench`).
``gmm``: the grouped-matmul kernels alone, on a CUDA GPU, in bfloat16 (:func:`bench_gmm`): TFLOP/s of the
forward and of forward + backward for the ``"triton"`` backend (``moe_ref.kernels.triton_gmm``),
``torch.nn.functional.grouped_mm``, a per-expert loop of ``torch.matmul``, and a dense GEMM of the same
FLOPs, on the up and down projections of Mixtral-8x7B (16k tokens, top-2 of 8 experts, d=4096, d_ff=14336)
and of a fine-grained MoE (64 experts, top-8, d=2048, d_ff=1408). Times come from
``triton.testing.do_bench``. It writes a JSON file and a PNG plot (with a roofline when the peak FLOP/s and
bandwidth are given) and refuses to run without CUDA: there are no CPU numbers for it.
``gpu``: the prepared check of one CUDA GPU in under 8 minutes (``moe_ref.book.gpu_check``): the Triton
backend's correctness in float32, float16 and bfloat16 against float64, the ``gmm`` benchmark, the layer against
``transformers`` in bfloat16, chapters 5 and 6 under nbval; one JSON file with provenance and a suggested
default backend. ``--dry-run`` checks its plumbing on the CPU with tiny shapes in seconds.

Example::

    python -m moe_ref.bench layer --runs 2 --reps 20 --profile \\
        --json chapters/data/layer_bench.json
    python -m moe_ref.bench gmm --json gmm.json --plot gmm.png \\
        --peak-tflops 989 --peak-bandwidth 4.8
    python -m moe_ref.bench gpu --out chapters/data/gpu_results.json
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

from ..ffn import FFN
from . import decode_bench, ep_bench, gpu_check, layer_bench

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


def rotations(names: list[str], reps: int):
    """Each repetition's running order, ``(rep, names)``: the list rotated by one more place each time.

    Timing every candidate once per repetition in this order means a slow spell of a shared machine hits all
    of them, and none always runs first (right after another candidate evicted its data from the caches).
    """
    for rep in range(reps):
        shift = rep % len(names)
        yield rep, names[shift:] + names[:shift]


def _minor_faults() -> int:
    """Minor page faults of this process so far (memory the OS maps in on first touch); 0 where unknown."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
        "min_ms", "times_ms", "ratio", "max_abs_diff", "page_faults"}}`` (``ratio`` is the median over
        ``moe_ref``'s; ``max_abs_diff`` compares the output with ``moe_ref``'s, ``None`` for ``dense``, whose
        function differs; ``page_faults`` is the median number of minor page faults in one timed step: fresh
        memory the OS maps in, which the allocator's policy decides).
    """
    from ..hf import from_hf

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
        faults = {name: [] for name in names}
        for _, order in rotations(names, reps):
            for name in order:
                faults_before = _minor_faults()
                start = time.perf_counter()
                outputs[name] = _step(modules[name], x, grad_out)
                times[name].append((time.perf_counter() - start) * 1e3)
                faults[name].append(_minor_faults() - faults_before)
        env["load_average_after"] = _load_average()
    finally:
        torch.set_num_threads(previous_threads)
    reference = statistics.median(times["moe_ref"])
    results = {}
    for name in names:
        median = statistics.median(times[name])
        diff = None if name == "dense" else float((outputs[name] - outputs["moe_ref"]).abs().max())
        results[name] = dict(median_ms=median, min_ms=min(times[name]), times_ms=times[name],
                             ratio=median / reference, max_abs_diff=diff,
                             page_faults=statistics.median(faults[name]))
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
             f"{'candidate':<16}{'median ms':>11}{'min ms':>10}{'x moe_ref':>11}{'max |diff|':>12}"
             f"{'page faults':>13}"]
    for name, r in result["results"].items():
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"{name:<16}{r['median_ms']:>11.2f}{r['min_ms']:>10.2f}{r['ratio']:>11.3f}{diff:>12}"
                     f"{r.get('page_faults', 0):>13.0f}")
    return "\n".join(lines)


# --- gmm: the grouped-matmul kernels -----------------------------------------------------------------------

#: Named MoE shapes of :func:`bench_gmm`: tokens, top-k, experts, d_model, d_ff (per expert).
GMM_SHAPES = {
    "mixtral-8x7b": dict(tokens=16384, k=2, experts=8, d_model=4096, d_ff=14336),
    "fine-grained-64x8": dict(tokens=16384, k=8, experts=64, d_model=2048, d_ff=1408),
    "fine-grained-256x8": dict(tokens=16384, k=8, experts=256, d_model=7168, d_ff=2048),  # DeepSeek-V3's routed
    "mixtral-decode-32": dict(tokens=32, k=2, experts=8, d_model=4096, d_ff=14336),  # one decode step, 32 sequences
}
#: Candidate names of :func:`bench_gmm`, in table order.
GMM_CANDIDATES = ("triton", "torch", "loop", "dense")


def gmm_problems(shape: dict) -> list[dict]:
    """The two grouped matmuls of one MoE layer: ``up`` ``[M, d_model] x [E, d_model, d_ff]`` and ``down``.

    ``M = tokens * k`` rows (every (token, expert) assignment). Returns dicts with ``projection``, ``M``,
    ``K``, ``N``, ``E`` and ``flops`` (``2 M K N``, the forward; forward + backward is three times it).
    """
    M, E, d, f = shape["tokens"] * shape["k"], shape["experts"], shape["d_model"], shape["d_ff"]
    return [dict(projection=name, M=M, K=K, N=N, E=E, flops=2 * M * K * N)
            for name, K, N in (("up", d, f), ("down", f, d))]


def random_group_sizes(tokens: int, k: int, experts: int, seed: int = 0) -> list[int]:
    """Rows per expert when each token picks ``k`` distinct experts uniformly at random (a balanced router)."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices
    return torch.bincount(choice.flatten(), minlength=experts).tolist()


def gpu_environment() -> dict:
    """GPU name, capability, torch/triton/CUDA versions and date (UTC); requires CUDA."""
    import triton
    props = torch.cuda.get_device_properties(0)
    return dict(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def bench_gmm(shapes: tuple[str, ...] = tuple(GMM_SHAPES), candidates: tuple[str, ...] = GMM_CANDIDATES, *,
              tokens: int | None = None, backward: bool = True, warmup_ms: int = 25, rep_ms: int = 100,
              seed: int = 0, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, timer=None,
              shape_table: dict | None = None, verbose: bool = True) -> dict:
    """TFLOP/s of grouped matmuls on the current CUDA GPU, in bfloat16 (by default).

    Args:
        shapes: names in :data:`GMM_SHAPES`.
        candidates: a subset of :data:`GMM_CANDIDATES`: ``"triton"`` (:func:`~moe_ref.kernels.grouped_mm.grouped_mm`
            with ``backend="triton"``), ``"torch"`` (``backend="torch"``), ``"loop"`` (one ``torch.matmul``
            per expert) and ``"dense"`` (one ``[M, K] x [K, N]`` matmul, the same FLOPs without groups).
        tokens: overrides the shapes' token count (16384).
        backward: also time forward + backward (``dX`` and ``dW``; counted as ``3 * 2 M K N`` FLOPs).
        warmup_ms, rep_ms: passed to ``triton.testing.do_bench``.
        seed: the random routing behind the group sizes (:func:`random_group_sizes`).
        device, dtype: where and in what to run. Off CUDA (the CPU plumbing check of
            ``moe_ref.book.gpu_check``: float32 or float16, ``"triton"`` under Triton's interpreter) a
            ``timer`` is required, and the times say nothing about a GPU.
        timer: ``timer(fn) -> milliseconds``; default ``triton.testing.do_bench`` (median) with ``warmup_ms``
            and ``rep_ms``.
        shape_table: where ``shapes`` are looked up (default :data:`GMM_SHAPES`).
        verbose: print a line per measurement.

    Returns:
        ``{"config", "env", "results"}``: ``env`` from :func:`gpu_environment` (:func:`environment` off CUDA);
        ``results`` a list of dicts
        with ``shape``, ``projection``, ``M``, ``K``, ``N``, ``E``, ``candidate``, ``mode`` (``"forward"`` or
        ``"forward+backward"``), ``ms`` (median) and ``tflops``.

    Raises:
        RuntimeError: ``device`` is CUDA and there is none.
        ValueError: unknown shapes or candidates, or no ``timer`` off CUDA.
    """
    device = torch.device(device)
    shape_table = GMM_SHAPES if shape_table is None else shape_table
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the gmm benchmark needs a CUDA GPU; none is visible to torch, so no numbers are "
                           "produced (the kernels can be checked on CPU under TRITON_INTERPRET=1 with pytest)")
    if device.type != "cuda" and timer is None:
        raise ValueError(f"timer is required on {device.type}: triton.testing.do_bench needs a GPU")
    if timer is None:
        import triton.testing

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    from ..kernels.grouped_mm import grouped_mm

    unknown = (set(shapes) - set(shape_table)) | (set(candidates) - set(GMM_CANDIDATES))
    if unknown:
        raise ValueError(f"unknown shapes or candidates {sorted(unknown)}; shapes: {tuple(shape_table)}, "
                         f"candidates: {GMM_CANDIDATES}")
    results = []
    for shape_name in shapes:
        shape = dict(shape_table[shape_name])
        if tokens is not None:
            shape["tokens"] = tokens
        counts = random_group_sizes(shape["tokens"], shape["k"], shape["experts"], seed)
        offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        for p in gmm_problems(shape):
            M, K, N, E = p["M"], p["K"], p["N"], p["E"]
            x = (torch.randn(M, K, device=device, dtype=dtype) * K ** -0.5).requires_grad_()
            w = (torch.randn(E, K, N, device=device, dtype=dtype) * K ** -0.5).requires_grad_()
            dense_w = w[0].detach().clone().requires_grad_()
            dy = torch.randn(M, N, device=device, dtype=dtype)

            ends = torch.tensor(counts).cumsum(0).tolist()
            bounds = list(zip([0] + ends[:-1], ends))

            def loop(a, b):  # the per-expert loop: one torch.matmul per expert
                return torch.cat([a[s:t] @ b[e] for e, (s, t) in enumerate(bounds)])

            fns = {"triton": lambda a, b: grouped_mm(a, b, offsets, backend="triton"),
                   "torch": lambda a, b: grouped_mm(a, b, offsets, backend="torch"),
                   "loop": loop,
                   "dense": lambda a, b: a @ dense_w}
            for name in candidates:
                fn = fns[name]
                modes = [("forward", 1, lambda: fn(x.detach(), w.detach()))]
                if backward:
                    def fwd_bwd(fn=fn):
                        x.grad = w.grad = dense_w.grad = None
                        fn(x, w).backward(dy)
                    modes.append(("forward+backward", 3, fwd_bwd))
                for mode, factor, call in modes:
                    ms = timer(call)
                    results.append(dict(shape=shape_name, **{k: p[k] for k in ("projection", "M", "K", "N", "E")},
                                        candidate=name, mode=mode, ms=ms, tflops=factor * p["flops"] / ms / 1e9))
                    if verbose:
                        print(f"{shape_name:<18}{p['projection']:<6}{name:<8}{mode:<18}{ms:>9.3f} ms "
                              f"{results[-1]['tflops']:>8.1f} TFLOP/s", flush=True)
            del x, w, dense_w, dy
            if device.type == "cuda":
                torch.cuda.empty_cache()
    config = dict(shapes={s: shape_table[s] if tokens is None else {**shape_table[s], "tokens": tokens}
                          for s in shapes},
                  candidates=list(candidates), dtype=str(dtype).removeprefix("torch."), backward=backward,
                  warmup_ms=warmup_ms, rep_ms=rep_ms, seed=seed)
    if device.type != "cuda":
        config.update(device=device.type, timer=getattr(timer, "__name__", "custom"))
    return dict(config=config, env=gpu_environment() if device.type == "cuda" else environment(), results=results)


def roofline_tflops(M: int, K: int, N: int, E: int, peak_tflops: float, peak_bandwidth_tbs: float,
                    bytes_per_element: int = 2) -> float:
    """Roofline bound of one grouped matmul: ``min(peak, intensity * bandwidth)`` in TFLOP/s.

    The bytes are the minimum traffic: ``x`` ``[M, K]``, all ``E`` weights ``[K, N]`` and ``y`` ``[M, N]``
    read or written once; ``peak_bandwidth_tbs`` is in TB/s.
    """
    traffic = bytes_per_element * (M * K + E * K * N + M * N)
    return min(peak_tflops, 2 * M * K * N / traffic * peak_bandwidth_tbs)


def plot_gmm(result: dict, path: str, *, peak_tflops: float | None = None,
             peak_bandwidth_tbs: float | None = None) -> None:
    """Bar chart of a :func:`bench_gmm` result (one panel per mode), saved as PNG at ``path``.

    With both peaks given, each problem also gets its roofline bound (:func:`roofline_tflops`) as a marker.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    problems = list(dict.fromkeys((r["shape"], r["projection"]) for r in rows))
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    width = 0.8 / len(names)
    for ax, mode in zip(axes[0], modes):
        for i, name in enumerate(names):
            values = [next((r["tflops"] for r in rows if (r["shape"], r["projection"]) == prob
                            and r["candidate"] == name and r["mode"] == mode), 0.0) for prob in problems]
            ax.bar([j + i * width for j in range(len(problems))], values, width, label=name)
        if peak_tflops and peak_bandwidth_tbs:
            for j, prob in enumerate(problems):
                r = next(r for r in rows if (r["shape"], r["projection"]) == prob)
                bound = roofline_tflops(r["M"], r["K"], r["N"], r["E"], peak_tflops, peak_bandwidth_tbs)
                ax.plot([j - width / 2, j + 0.8 - width / 2], [bound, bound], "k--", lw=1,
                        label="roofline" if j == 0 else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(problems))])
        ax.set_xticklabels([f"{s}\n{p}" for s, p in problems], fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, bfloat16")
        ax.legend(fontsize=8)
    env = result["env"]
    fig.suptitle(f"grouped matmul on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, {env['date']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_gmm(result: dict) -> str:
    """The table of a :func:`bench_gmm` result, as text."""
    env = result["env"]
    lines = [f"grouped matmul, bfloat16, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
             f"{'shape':<18}{'proj':<6}{'candidate':<10}{'mode':<18}{'ms':>9}{'TFLOP/s':>9}"]
    for r in result["results"]:
        lines.append(f"{r['shape']:<18}{r['projection']:<6}{r['candidate']:<10}{r['mode']:<18}{r['ms']:>9.3f}"
                     f"{r['tflops']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """The command line: ``python -m moe_ref.bench {layer,gmm,ep,decode,gpu} [options]``."""
    parser = argparse.ArgumentParser(prog="python -m moe_ref.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    layer = commands.add_parser("layer", help="the CPU targets: MoE layer vs transformers' Mixtral block vs a dense "
                                              "FFN, training and decode shapes")
    layer_bench.add_arguments(layer)
    gmm = commands.add_parser("gmm", help="grouped-matmul kernels (triton, torch, loop, dense) on a CUDA GPU")
    gmm.add_argument("--shapes", nargs="+", default=list(GMM_SHAPES), choices=list(GMM_SHAPES))
    gmm.add_argument("--candidates", nargs="+", default=list(GMM_CANDIDATES), choices=GMM_CANDIDATES)
    gmm.add_argument("--tokens", type=int, default=None, help="override the shapes' 16384 tokens")
    gmm.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    gmm.add_argument("--seed", type=int, default=0)
    gmm.add_argument("--json", metavar="PATH", default="gmm_results.json")
    gmm.add_argument("--plot", metavar="PATH", default="gmm_results.png")
    gmm.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s, for the roofline")
    gmm.add_argument("--peak-bandwidth", type=float, default=None, help="peak memory bandwidth in TB/s")
    ep = commands.add_parser("ep", help="expert parallelism on CPU: per-rank compute and all-to-all time, W=1,2,4")
    ep_bench.add_arguments(ep)
    decode = commands.add_parser("decode", help="MoE layer forward at decode shapes (1-64 tokens) vs transformers "
                                                "and dense FFNs, 1 thread")
    decode_bench.add_arguments(decode)
    gpu = commands.add_parser("gpu", help="prepared check of one CUDA GPU (<8 min): triton correctness, gmm and "
                                          "layer benchmarks, chapters 5-6; --dry-run checks it on the CPU")
    gpu_check.add_arguments(gpu)
    args = parser.parse_args(argv)
    if args.command == "gpu":
        return gpu_check.run(args, argv)
    if args.command == "decode":
        return decode_bench.run(args, argv)
    if args.command == "ep":
        return ep_bench.run(args, argv)
    if args.command == "gmm":
        if not torch.cuda.is_available():
            parser.exit(2, "python -m moe_ref.bench gmm: no CUDA GPU is visible to torch; this benchmark only "
                           "measures GPUs and produces no numbers on the CPU.\n")
        result = bench_gmm(tuple(args.shapes), tuple(args.candidates), tokens=args.tokens,
                           backward=not args.forward_only, seed=args.seed)
        print(format_gmm(result))
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        plot_gmm(result, args.plot, peak_tflops=args.peak_tflops, peak_bandwidth_tbs=args.peak_bandwidth)
        print(f"wrote {args.json} and {args.plot}")
        return result
    return layer_bench.run(args, argv)


if __name__ == "__main__":
    main()
